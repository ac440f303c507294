"""fundusrt.export."""
