"""CUDA source for the patching and ROI kernels, its launch tables and its compilation.

Nothing here needs a GPU: `tables` is NumPy, `build` drives NVRTC / nvcc (compile-only). The
driver-side launcher is `fundusrt.kernels.cuda_patchify`.
"""

from pathlib import Path

SOURCE_PATH = Path(__file__).with_name("patchify.cu")
# Pillow's BICUBIC weights, included by patchify.cu and by the CPU resampler (kernels/_resample.c)
HEADER_PATH = Path(__file__).with_name("pillow_bicubic.h")
HOST_HARNESS_PATH = Path(__file__).with_name("patchify_host.cpp")

__all__ = ["HEADER_PATH", "HOST_HARNESS_PATH", "SOURCE_PATH"]
