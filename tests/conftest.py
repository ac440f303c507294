"""Fixtures shared across test modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fundusrt.runtime.protocol import PROTOCOL_NAME
from tests._protocols import protocol_without_gradability

TinyPackage = Callable[..., tuple[Path, Path]]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Verification stamps and kernel caches of the tests go to a temporary folder, not the user's cache."""
    import os

    os.environ.setdefault("FUNDUSRT_CACHE", str(tmp_path_factory.mktemp("fundusrt-cache")))


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> TinyPackage:
    """`get(family, seed=0, max_seq_len=None) -> (checkpoint, package)`: a tiny random native checkpoint and its
    exported package, built once per session for each argument set (an export costs 10-30 s here).

    The package carries `protocol_without_gradability()` as its own protocol. Tests must not modify what
    they get: copy it first.
    """
    built: dict[tuple[str, int, int | None], tuple[Path, Path]] = {}

    def get(family: str, seed: int = 0, max_seq_len: int | None = None) -> tuple[Path, Path]:
        key = (family, seed, max_seq_len)
        if key not in built:
            from fundusrt.export import export_package
            from fundusrt.models.tiny import write_tiny_checkpoint

            root = tmp_path_factory.mktemp(f"tiny-{family}-{seed}")
            checkpoint = write_tiny_checkpoint(root / "ckpt", family=family, seed=seed)
            limits = {} if max_seq_len is None else {"max_seq_len": max_seq_len}
            package = Path(export_package(checkpoint, root / "pkg", **limits))
            (package / PROTOCOL_NAME).write_text(json.dumps(protocol_without_gradability()))
            built[key] = checkpoint, package
        return built[key]

    return get
