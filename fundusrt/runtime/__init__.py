"""fundusrt.runtime."""
