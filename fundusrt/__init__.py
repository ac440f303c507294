"""fundusrt: an edge inference runtime for ophthalmic vision-language models.

The public API is loaded lazily so that `import fundusrt` pulls in nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Pipeline", "load_package", "__version__"]

if TYPE_CHECKING:
    from fundusrt.runtime.pipeline import Pipeline, load_package


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "load_package"):
        from fundusrt.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'fundusrt' has no attribute {name!r}")
