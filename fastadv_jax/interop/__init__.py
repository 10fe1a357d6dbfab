"""PyTorch interoperability: torch_interop (Flax variables <-> state_dicts in the original
code's layouts; plain numpy) and torch_models (the PyTorch models, self-contained: it imports
torch and is written to be copied next to exported weights, so the package leaves it out of
`__all__` and does not import it)."""
from fastadv_jax.interop import torch_interop

__all__ = ["torch_interop"]
