"""Op definitions (torch.library) and the torch.compile backend."""
