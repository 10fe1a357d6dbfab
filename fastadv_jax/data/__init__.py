"""Data: datasets (TFDS or offline files -> uint8 arrays on the host, batches as a pure function
of seed and step) and augment (uint8 -> float, random crop and flip, on the device)."""
