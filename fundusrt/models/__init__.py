"""The PyTorch reference model and its checkpoint loaders (build side: imports torch)."""

from fundusrt.models.loader import CheckpointError, detect_layout, load
from fundusrt.models.lvlm import LVLM

__all__ = ["LVLM", "CheckpointError", "detect_layout", "load"]
