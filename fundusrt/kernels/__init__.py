"""Adaptive-resolution patching: tiling policies (pure Python), fundus ROI detection and the NumPy path.

The CUDA path (`fundusrt.kernels.cuda_patchify`) executes the same TilePlan and is imported on demand.
"""

from fundusrt.kernels.patchify import Patches, patchify, plan_image
from fundusrt.kernels.roi import find_fundus_roi
from fundusrt.kernels.tiling import (
    TilePlan,
    TileSource,
    anyres_best_resolution,
    internvl_grid,
    plan_tiles,
)

__all__ = [
    "Patches",
    "TilePlan",
    "TileSource",
    "anyres_best_resolution",
    "find_fundus_roi",
    "internvl_grid",
    "patchify",
    "plan_image",
    "plan_tiles",
]
