"""Prepacked weights mapped from disk, for ONNX Runtime on the CPU.

When a session is created, ORT's CPU kernels (MatMulNBits, the MLAS GEMMs) copy every constant weight
into their own blocked layout ("prepacking") and keep that copy on the heap, so a decoder of N bytes
costs N bytes of private memory on top of its file (8.4 GiB of heap for the 4.3 GiB INT4 decoder of the
8B package). ORT can save an optimised copy of a model whose prepacked weights sit in its external data
file (`session.save_external_prepacked_constant_initializers`); a session created from that copy maps
them from the file instead. Mapped pages are the kernel's page cache: shared by every process that runs
the package (Ray actors, the node), and dropped under memory pressure instead of swapping.

The copy is made once per component, ORT version and CPU (prepacked layouts are MLAS's, which depend on
the CPU's vector extensions), under $FUNDUSRT_CACHE/ort-prepacked, the first time a package is opened. It
is trusted as the verified-package stamps are: whoever can write the cache folder can change it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fundusrt.manifest import ComponentSpec, cache_root

logger = logging.getLogger(__name__)

# Components whose files are smaller than this load as they are: the copy costs a second session at first
# load and disk, and a small component's prepacked heap is no matter.
MIN_BYTES = 64 << 20
_DONE = "complete"


def component_bytes(package_dir: Path, spec: ComponentSpec) -> int:
    """Bytes of a component's files (graph plus external data)."""
    return sum((package_dir / name).stat().st_size for name in (spec.file, *spec.data_files))


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def cache_key(spec: ComponentSpec, ort_version: str) -> str:
    """What the copy depends on: the component's bytes, ORT's version, the machine and its vector extensions."""
    parts = [spec.sha256, *sorted(spec.data_files.values()), ort_version, platform.machine(), _cpu_flags()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def mapped_copy(ort: Any, source: Path, spec: ComponentSpec, component: str,
                options: Callable[[], Any]) -> Path | None:
    """The path of `source`'s optimised copy with prepacked weights in its data file, made if missing.

    `options()` gives the session options the copy is optimised with. Returns None, after a warning, when
    the copy cannot be made (a read-only cache, a full disk, an ORT that refuses): the caller then loads
    `source` as it is, which is slower to no one but uses more memory.
    """
    folder = cache_root() / "ort-prepacked" / cache_key(spec, ort.__version__)
    model = folder / f"{component}.onnx"
    if (folder / _DONE).is_file():
        return model
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            settings = options()
            # ORT warns that a saved optimised model fits only the machine it was made on: the key says as much
            settings.log_severity_level = 3
            settings.optimized_model_filepath = str(staging / model.name)
            settings.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              f"{model.name}.data")
            settings.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                              "1024")
            settings.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            ort.InferenceSession(str(source), sess_options=settings, providers=["CPUExecutionProvider"])
            (staging / _DONE).write_text(f"{source.name} {spec.sha256}\n")
            os.replace(staging, folder)  # another process may have won the race: its copy is as good
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        if (folder / _DONE).is_file():
            return model
        logger.warning("cannot write the prepacked copy of %s to %s (%s); its weights are prepacked on the heap",
                       component, folder, exc)
        return None
    except Exception as exc:  # ORT's own untyped errors
        logger.warning("ONNX Runtime could not save a prepacked copy of %s (%s); its weights are prepacked on the "
                       "heap", component, exc)
        return None
    return model
