"""DICOMweb in and out against a real server: Orthanc with its DICOMweb plugin on 127.0.0.1.

QIDO-RS lists the studies, WADO-RS fetches them, STOW-RS posts the archive in and the results back;
what Orthanc stored is read back through its own REST API.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from fundusrt.dicom.dicomweb import DicomWebError, StowError, connect, retrieve_study, search_studies, store_files
from tests.test_screen import MAX_NEW_TOKENS, assert_same_findings, reference_eyes, settings, table_eyes, \
    write_archive

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
DICOMWEB_STUDIES = 60  # the figure: the same archive size as the Ray test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """An Orthanc server with the DICOMweb plugin, in a temporary folder, on loopback only."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            pytest.skip("Orthanc not installed (Debian package orthanc)")
        if not DICOMWEB_PLUGIN.is_file():
            pytest.skip("Orthanc's DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.base}/dicom-web"
        config = {"Name": "fundusrt-dicomweb-test", "StorageDirectory": str(folder / "db"),
                  "IndexDirectory": str(folder / "db"), "DicomPort": free_port(), "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        self.process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=open(self.log, "w"))
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rest("/dicom-web/studies")
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.2)

    def rest(self, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(self.base + path, data=data), timeout=10) as response:
            raw = response.read()
        return raw if path.endswith("/file") else json.loads(raw or b"null")

    def instances(self, **query: str) -> list[Any]:
        """Datasets Orthanc holds that match `query` (DICOM keywords), read back through its REST API."""
        found = self.rest("/tools/find", {"Level": "Instance", "Query": query})
        return [pydicom.dcmread(io.BytesIO(self.rest(f"/instances/{i}/file"))) for i in found]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One server for the module (a start and stop take seconds); tests use studies of their own UIDs."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def test_qido_lists_page_by_page_and_wado_fetches_the_instances(orthanc: Orthanc, tmp_path: Path) -> None:
    origin = write_archive(tmp_path / "archive", 5, bases=1)
    files = sorted((tmp_path / "archive").rglob("*.dcm"))
    client = connect(orthanc.dicomweb)
    assert all(o.stored for o in store_files(client, files))
    assert set(origin) <= set(search_studies(client, page_size=2))  # 3 pages of 2 at least
    uid = sorted(origin)[0]
    fetched = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, retrieve_study(client, uid, tmp_path / "w"))}
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files) if ds.StudyInstanceUID == uid}
    assert fetched.keys() == sent.keys() and len(sent) >= 2
    for sop, ds in sent.items():
        assert np.array_equal(fetched[sop].pixel_array, ds.pixel_array), sop


def test_stow_names_each_refused_object_and_stores_the_rest(orthanc: Orthanc, tmp_path: Path) -> None:
    write_archive(tmp_path / "archive", 1, bases=1)
    good = sorted((tmp_path / "archive").rglob("*.dcm"))[0]
    no_study = pydicom.dcmread(good)
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    del no_study.StudyInstanceUID  # Orthanc cannot file an instance without one
    no_study.save_as(tmp_path / "no-study.dcm", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(StowError) as refused:
        store_files(connect(orthanc.dicomweb), [good, tmp_path / "no-study.dcm", tmp_path / "notes.txt"])
    outcomes = {o.path.name: o for o in refused.value.outcomes}
    assert outcomes[good.name].stored
    assert not outcomes["no-study.dcm"].stored and outcomes["no-study.dcm"].reason.startswith("0xC000")
    assert not outcomes["notes.txt"].stored and "not a DICOM object" in outcomes["notes.txt"].reason
    assert "no-study.dcm: 0xC000" in str(refused.value) and "2 of 3 object(s) not stored" in str(refused.value)
    assert len(orthanc.instances(SOPInstanceUID=str(pydicom.dcmread(good).SOPInstanceUID))) == 1
    assert orthanc.instances(SOPInstanceUID=str(no_study.SOPInstanceUID)) == []

    with pytest.raises(DicomWebError, match=r"STOW-RS of 1 object\(s\) at http://127.0.0.1:\d+/dicom-web failed: "
                                            "ConnectionError"):
        store_files(connect(f"http://127.0.0.1:{free_port()}/dicom-web", retries=0), [good])
    with pytest.raises(DicomWebError, match="must start with http"):
        connect("pacs:8042/dicom-web")


@pytest.mark.slow
def test_screen_from_dicomweb_posts_the_results_back(tiny_package, tmp_path: Path) -> None:
    from fundusrt.scale import open_source, screen

    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc")  # its own: QIDO must list this archive and nothing else
    try:
        _screen_from_dicomweb(orthanc, tiny_package("internvit-shuffle", seed=1)[1], tmp_path, open_source, screen)
    finally:
        orthanc.stop()


def _screen_from_dicomweb(orthanc: Orthanc, package: Path, tmp_path: Path, open_source: Any, screen: Any) -> None:

    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the scale extra")
    origin = write_archive(tmp_path / "archive", DICOMWEB_STUDIES, bases=2)
    client = connect(orthanc.dicomweb)
    store_files(client, sorted((tmp_path / "archive").rglob("*.dcm")))  # the PACS holds the archive

    out = tmp_path / "out"
    summary = screen(open_source(orthanc.dicomweb, tmp_path / "index.sqlite", page_size=5),
                     settings(package, out, stow_url=orthanc.dicomweb))
    assert summary["done"] == DICOMWEB_STUDIES and summary["failed"] == 0
    table = pq.read_table(out / "results.parquet")
    assert_same_findings(table_eyes(table), reference_eyes(package, origin))
    for row in table.to_pylist():
        assert row["stowed"] == len(list(Path(row["results_dir"]).glob("*.dcm"))) and row["fetch_seconds"] > 0
    for uid in origin:
        (sr,) = orthanc.instances(StudyInstanceUID=uid, Modality="SR")
        assert sr.SOPClassUID == COMPREHENSIVE_SR
        evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
        fundus = {str(ds.SOPInstanceUID) for ds in orthanc.instances(StudyInstanceUID=uid, Modality="OP")}
        assert evidence == fundus

    # `fundusrt run --stow`: the same objects `--dicom-out` writes, posted; nothing kept on disk without it
    study = next((tmp_path / "archive").iterdir())
    study_uid = str(pydicom.dcmread(next(study.iterdir())).StudyInstanceUID)
    proc = subprocess.run([sys.executable, "-m", "fundusrt.cli", "run", str(study), "--package", str(package),
                           "--max-new-tokens", str(MAX_NEW_TOKENS), "--pdf", "--stow", orthanc.dicomweb],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stowed 2 object(s)" in proc.stdout or "stowed 3 object(s)" in proc.stdout, proc.stdout
    assert len(orthanc.instances(StudyInstanceUID=study_uid, Modality="SR")) == 2  # the screen's and the run's
    assert len(orthanc.instances(StudyInstanceUID=study_uid, Modality="DOC")) == 1  # the run's PDF


@pytest.mark.slow
def test_serve_posts_results_with_stow(orthanc: Orthanc, tiny_package, tmp_path: Path) -> None:
    from fundusrt.config import GenerationConfig
    from fundusrt.node import Node, NodeConfig
    from fundusrt.runtime.pipeline import load_package

    package = tiny_package("internvit-shuffle", seed=1)[1]
    origin = write_archive(tmp_path / "archive", 1, bases=1)
    pipeline = load_package(package, threads=1)
    watch = tmp_path / "watch"
    watch.mkdir()
    node = Node(NodeConfig(spool=tmp_path / "spool", port=None, watch_dir=watch, stow_url=orthanc.dicomweb,
                           quiet_seconds=0.5, poll_seconds=0.1),
                lambda study_dir: pipeline.run_study(study_dir, gen=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)))
    node.start()
    try:
        shutil.copytree(tmp_path / "archive", watch, dirs_exist_ok=True)
        assert node.wait_until_idle(120)
    finally:
        node.stop()
    (uid,) = origin
    (sr,) = orthanc.instances(StudyInstanceUID=uid, Modality="SR")
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    sent = [json.loads(line) for line in (tmp_path / "spool" / "audit.log").read_text().splitlines()]
    assert any(e["event"] == "sent" and e.get("to") == orthanc.dicomweb for e in sent)
