"""The backend protocol and the registry of backends by name.

A backend turns a model package into four sessions: `Session`s for vision, connector and embed
(`run(dict) -> dict` on numpy arrays) and a `DecoderSession` that owns the KV cache. Each backend
lives in its own module, imported only when asked for by name, so that its heavy imports
(onnxruntime, tensorrt, torch) never happen for the others.

The decoder protocol is batch 1: a device runs one study at a time, and a fork is how several
continuations of one prompt are generated.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fundusrt.manifest import Manifest


class BackendError(RuntimeError):
    """A backend is unknown, not installed on this machine, or cannot open a package."""


class Session(Protocol):
    """A stateless component (vision, connector, embed)."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named numpy inputs; return every output by name as numpy."""
        ...


class DecoderSession(Protocol):
    """A decoder with its own KV cache, one sequence at a time."""

    @property
    def seq_len(self) -> int:
        """Tokens currently held in the KV cache."""
        ...

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the package allows."""
        ...

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append `inputs_embeds` (1, seq, hidden) to the cache; return the last position's logits (vocab,)."""
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """Embed `token_id`, append it to the cache and return the next logits (vocab,)."""
        ...

    def reset(self) -> None:
        """Empty the cache."""
        ...

    def fork(self) -> DecoderSession:
        """An independent session starting from this one's cache; steps on either never affect the other."""
        ...


@dataclass
class PackageSessions:
    """What a backend opens for one package."""

    vision: Session
    connector: Session
    embed: Session
    decoder: DecoderSession
    backend: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives: `module.open_package(package_dir, manifest, threads=..., **options)`."""

    module: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)


# Adding a backend (tensorrt, torch) is one line here plus its module.
BACKENDS: dict[str, BackendEntry] = {
    "ort-cpu": BackendEntry("fundusrt.runtime.backends.onnxruntime", "ONNX Runtime, CPU execution provider",
                            {"providers": ["CPUExecutionProvider"]}),
    "ort-cuda": BackendEntry("fundusrt.runtime.backends.onnxruntime", "ONNX Runtime, CUDA execution provider",
                             {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}),
    "ort-trt": BackendEntry("fundusrt.runtime.backends.onnxruntime", "ONNX Runtime, TensorRT execution provider",
                            {"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider"]}),
    "trt": BackendEntry("fundusrt.runtime.backends.tensorrt", "TensorRT engines (fundusrt build-engines)", {}),
    "trt-graph": BackendEntry("fundusrt.runtime.backends.tensorrt", "TensorRT engines, decode steps as CUDA graphs",
                              {"cuda_graph": True}),
}


def _entry(name: str) -> BackendEntry:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run on this machine, else why not (and what to install)."""
    entry = _entry(name)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        return f"backend {name!r} cannot be imported: {exc}"
    return module.unavailable_reason(**entry.options)


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def open_package(name: str, package_dir: str | Path, manifest: Manifest, threads: int | None = None) -> PackageSessions:
    """Open a (verified) package with backend `name`.

    Args:
        name: a key of BACKENDS, e.g. "ort-cpu".
        package_dir: the package directory.
        manifest: its manifest, already loaded and verified.
        threads: intra-op threads per session (None: the backend's default).
    """
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendError(reason)
    entry = _entry(name)
    module = importlib.import_module(entry.module)
    sessions: PackageSessions = module.open_package(Path(package_dir), manifest, threads=threads, **entry.options)
    sessions.backend = name
    return sessions
