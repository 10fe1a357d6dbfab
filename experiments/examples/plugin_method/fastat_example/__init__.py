"""An example plugin package for fastadv_jax: R-FGSM as a registered method (rfgsm.py)."""
