"""fundusrt.runtime.backends."""
