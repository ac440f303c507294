"""Inference backends, one module each, opened by name through `base.open_package`."""

from fundusrt.runtime.backends.base import (
    BACKENDS,
    BackendError,
    DecoderSession,
    PackageSessions,
    Session,
    available_backends,
    open_package,
)

__all__ = ["BACKENDS", "BackendError", "DecoderSession", "PackageSessions", "Session", "available_backends",
           "open_package"]
