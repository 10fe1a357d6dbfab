"""PyTorch interoperability: torch_interop (Flax variables <-> state_dicts in the original
code's layouts; plain numpy) and torch_models (the PyTorch models, self-contained)."""
