"""Archive screening (`fundusrt screen`): studies from folders, CSV lists or DICOMweb, in this process or on
Ray Data actors, into per-study results and one Parquet table. Nothing here is imported by the runtime."""

from fundusrt.scale.runner import RayOptions, screen
from fundusrt.scale.sources import SourceError, StudyRef, open_source
from fundusrt.scale.worker import ScreenSettings, StudyScreener

__all__ = ["RayOptions", "ScreenSettings", "SourceError", "StudyRef", "StudyScreener", "open_source", "screen"]
