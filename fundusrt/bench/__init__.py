"""fundusrt.bench."""
