"""fundusrt.kernels."""
