"""The backend protocol and the registry of backends by name.

A backend turns a model package into four sessions: `Session`s for vision, connector and embed
(`run(dict) -> dict` on numpy arrays) and a `DecoderSession` that owns the KV cache. Each backend
lives in its own module, imported only when asked for by name, so that its heavy imports
(onnxruntime, tensorrt, torch) never happen for the others.

The decoder protocol is batch 1 for generation: a device runs one study at a time, and a fork is how
several continuations of one prompt are generated. Scoring a closed question's options is the one batched
step: `continuation_logits` advances all options together from one cache, in one batch of rows where the
backend's decoder takes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fundusrt.config import TilingConfig
from fundusrt.kernels import Patches, patchify
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

    def continuation_logits(self, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each continuation (token ids, at least one), the logits after each of its tokens.

        Every continuation starts from this session's cache, which is left unchanged: the array for
        continuation c is (len(c), vocab), its row j the next-token logits after c[0..j]. A backend runs
        them as one batch where its decoder takes one (`continuation_logits_by_forks` where it does not).
        """
        ...


def check_continuations(decoder: DecoderSession, continuations: Sequence[Sequence[int]]) -> int:
    """The longest continuation's length, after checking that each has a token and all fit the package."""
    if any(len(tokens) == 0 for tokens in continuations):
        raise ValueError("every continuation needs at least one token")
    longest = max((len(tokens) for tokens in continuations), default=0)
    if decoder.seq_len + longest > decoder.max_seq_len:
        raise ValueError(f"sequence of {decoder.seq_len + longest} tokens exceeds the package's max_seq_len "
                         f"{decoder.max_seq_len}")
    return longest


def continuation_logits_by_forks(decoder: DecoderSession, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """`DecoderSession.continuation_logits` for a decoder that only runs batch 1: a fork per continuation."""
    check_continuations(decoder, continuations)
    # each fork is dropped once its continuation is decoded, so a backend's KV slot pool reuses one slot
    return [_decode_each(decoder.fork(), tokens) for tokens in continuations]


def _decode_each(session: DecoderSession, tokens: Sequence[int]) -> np.ndarray:
    return np.stack([session.decode(int(token)) for token in tokens])


class DeviceContext(Protocol):
    """A backend's device context (e.g. a CUDA context), which must be current on the thread that calls it."""

    def activate(self) -> None:
        """Make the context current on the calling thread."""
        ...


# (image, tiling) -> a context manager yielding an object with pixel_values (what the vision session takes),
# plan and num_tiles; leaving it frees what the patches hold (device memory, for a GPU backend).
Patchify = Callable[[np.ndarray, TilingConfig], contextlib.AbstractContextManager[Any]]


def host_patchify(image: np.ndarray, tiling: TilingConfig) -> contextlib.AbstractContextManager[Patches]:
    """The CPU patching path (`kernels.patchify`): numpy tiles, nothing to free."""
    return contextlib.nullcontext(patchify(image, tiling))


@dataclass
class PackageSessions:
    """What a backend opens for one package; `patchify` is where the backend wants the image's tiles made."""

    vision: Session
    connector: Session
    embed: Session
    decoder: DecoderSession
    backend: str
    details: dict[str, Any] = field(default_factory=dict)
    patchify: Patchify = host_patchify


class _OnContext:
    """A session whose every call first makes the backend's context current on the calling thread."""

    def __init__(self, session: Session, context: DeviceContext) -> None:
        self._session, self._context = session, context

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        self._context.activate()
        return self._session.run(inputs)


class _DecoderOnContext:
    """A decoder session whose every call (forks included) first makes the backend's context current."""

    def __init__(self, decoder: DecoderSession, context: DeviceContext) -> None:
        self._decoder, self._context = decoder, context

    @property
    def seq_len(self) -> int:
        return self._decoder.seq_len

    @property
    def max_seq_len(self) -> int:
        return self._decoder.max_seq_len

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self._context.activate()
        return self._decoder.prefill(inputs_embeds)

    def decode(self, token_id: int) -> np.ndarray:
        self._context.activate()
        return self._decoder.decode(token_id)

    def reset(self) -> None:
        self._context.activate()
        self._decoder.reset()

    def fork(self) -> _DecoderOnContext:
        self._context.activate()
        return _DecoderOnContext(self._decoder.fork(), self._context)

    def continuation_logits(self, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        self._context.activate()
        return self._decoder.continuation_logits(continuations)


def bind_context(sessions: PackageSessions, context: DeviceContext) -> PackageSessions:
    """The sessions with `context` made current before every call, on whichever thread makes it.

    A CUDA context is current per thread, and a package is opened on one thread but run on others (the
    node loads it on its main thread and runs studies on a worker), so making it current once at load
    time is not enough.
    """
    return dataclasses.replace(sessions, vision=_OnContext(sessions.vision, context),
                               connector=_OnContext(sessions.connector, context),
                               embed=_OnContext(sessions.embed, context),
                               decoder=_DecoderOnContext(sessions.decoder, context))


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
