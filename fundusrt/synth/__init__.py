"""fundusrt.synth."""
