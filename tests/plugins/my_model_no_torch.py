"""The plugin model of my_model.py registered again under another name, without a PyTorch
layout: the model torch_export finds and refuses (tests/test_one_line_errors.py)."""
import dataclasses

import my_model

from fastadv_jax import models

RECORD = models.register(dataclasses.replace(my_model.RECORD, name="my_model_no_torch",
                                             torch=None))
