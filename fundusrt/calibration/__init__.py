"""fundusrt.calibration."""
