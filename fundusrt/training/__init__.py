"""fundusrt.training."""
