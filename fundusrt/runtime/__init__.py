"""fundusrt.runtime: backends, generation, the Pipeline API and study reports.

Never imports torch, transformers or the build side (models, export, calibration, training).
"""
