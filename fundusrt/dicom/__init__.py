"""fundusrt.dicom."""
