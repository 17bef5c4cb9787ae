"""Pure PyTorch modules of the Chroma 1.0 model: no file or network I/O here."""
