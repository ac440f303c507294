"""Package verification is paid once: a stamp skips the hashing until any file of the package changes.

Reference: the full sha256 check (`Manifest.verify`) on the same files; the stamp may only skip it
when nothing changed, and a changed byte (even with the file's mtime put back) must be caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fundusrt.manifest import Manifest, PackageError
from fundusrt.runtime.pipeline import load_package


@pytest.fixture()
def package(tiny_package, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_package("internvit-shuffle", seed=0)[1], tmp_path / "pkg"))


def flip_byte(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_second_load_skips_hashing_and_a_changed_byte_is_caught(package: Path, tmp_path: Path) -> None:
    manifest, stamps = Manifest.load(package), tmp_path / "stamps"
    assert manifest.verify_stamped(package, stamps) is True
    assert manifest.verify_stamped(package, stamps) is False
    assert manifest.verify_stamped(package, stamps, force=True) is True
    flip_byte(package / "vision.onnx", keep_mtime=True)  # size and mtime as before: ctime still moves
    with pytest.raises(PackageError, match="vision.onnx: sha256"):
        manifest.verify_stamped(package, stamps)
    with pytest.raises(PackageError, match="vision.onnx: sha256"):  # a failed check leaves no stamp behind
        manifest.verify_stamped(package, stamps)


def test_external_data_change_is_caught_by_load_package(package: Path) -> None:
    load_package(package)
    data = next(package.glob("*.data"), None)
    if data is None:  # tiny packages keep weights inline; give the decoder an external-data file
        import onnx

        model = onnx.load(str(package / "decoder.onnx"))
        onnx.save(model, str(package / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
                  size_threshold=1024)
        manifest = Manifest.load(package)
        spec = manifest.components["decoder"]
        from fundusrt.manifest import sha256_file

        spec.sha256 = sha256_file(package / "decoder.onnx")
        spec.data_files = {"decoder.onnx.data": sha256_file(package / "decoder.onnx.data")}
        manifest.save(package)
        data = package / "decoder.onnx.data"
    load_package(package)  # stamped (a new manifest is a new stamp)
    flip_byte(data, keep_mtime=False)
    with pytest.raises(PackageError, match=f"{data.name}: sha256"):
        load_package(package)


def test_verify_verb(package: Path) -> None:
    run = [sys.executable, "-m", "fundusrt.cli", "verify", str(package)]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "stamped" in proc.stdout, proc.stderr
    flip_byte(package / "tokenizer.json", keep_mtime=True)
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "tokenizer.json: sha256" in proc.stderr
