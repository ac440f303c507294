"""The package `fundusrt bench --quick` measures when none is given: the shipped demo model, exported once per work dir.

The checkpoint is `models/demo` (see `fundusrt.demo.DEMO_CHECKPOINT`); its package stays in the work dir
and is reused while it still verifies. Build-side: needs the [export] extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fundusrt.demo import DEMO_CHECKPOINT
from fundusrt.manifest import Manifest, PackageError

DEMO_MAX_SEQ_LEN = 512


def _package_ok(package: Path) -> bool:
    try:
        Manifest.load(package).verify(package)
    except (PackageError, OSError, ValueError):
        return False
    return True


def ensure_demo_package(work_dir: str | Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(checkpoint, package) of the demo model, exporting the package under `work_dir` when missing or broken."""
    from fundusrt._deps import require

    package = Path(work_dir) / "demo" / "package"
    if _package_ok(package):
        return DEMO_CHECKPOINT, package
    if not (DEMO_CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"the demo checkpoint is missing at {DEMO_CHECKPOINT}; pass --package and --checkpoint")
    require("torch", "exporting the demo package (or pass --package and --checkpoint)")
    from fundusrt.export import export_package

    log(f"exporting the demo model {DEMO_CHECKPOINT.name} to {package}")
    export_package(DEMO_CHECKPOINT, package, max_seq_len=DEMO_MAX_SEQ_LEN, overwrite=True)
    return DEMO_CHECKPOINT, package
