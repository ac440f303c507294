"""fundusrt.models."""
