"""The PyTorch reference model and its checkpoint loaders (build side: imports torch on first use).

Names resolve lazily so that `fundusrt inspect --help` and its missing-dependency message work
where torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fundusrt.models.loader import CheckpointError, detect_layout, load
    from fundusrt.models.lvlm import LVLM

__all__ = ["LVLM", "CheckpointError", "detect_layout", "load"]
_HOME = {"LVLM": "fundusrt.models.lvlm", "CheckpointError": "fundusrt.models.loader",
         "detect_layout": "fundusrt.models.loader", "load": "fundusrt.models.loader"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
