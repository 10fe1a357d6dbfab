"""PyTorch interoperability: torch_interop (Flax variables <-> state_dicts in the original
code's layouts; plain numpy) and torch_models (the PyTorch models, self-contained: it imports
torch and is written to be copied next to exported weights, so `__all__` leaves it out and the
API reference does not import it)."""
__all__ = ["torch_interop"]
