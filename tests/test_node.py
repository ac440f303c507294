"""The DICOM node against real peers: dcmtk storescu, a pynetdicom receiving SCP, Orthanc; a real tiny model.

Everything listens and connects on 127.0.0.1. Tests that need the exported tiny package (about 30 s
to build) or many studies are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from fundusrt.config import GenerationConfig
from fundusrt.node import Destination, Node, NodeConfig, NodeConfigError, StateStore
from fundusrt.node.state import DONE, FAILED, PROCESSING, RECEIVED, SENDING
from fundusrt.synth import draw_fundus, random_case, write_op_image, write_study

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GEN = GenerationConfig(max_new_tokens=6)


# ---------------------------------------------------------------- helpers

def dcmtk_storescu() -> str:
    """dcmtk's storescu (pynetdicom installs a script of the same name into the venv; skip that one)."""
    for folder in os.get_exec_path():
        candidate = Path(folder) / "storescu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            proc = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10)
            if "dcmtk" in (proc.stdout + proc.stderr).lower():
                return str(candidate)
    pytest.skip("dcmtk storescu not installed (Debian package dcmtk)")


# dcmtk storescu proposes one compressed syntax per run (-xy JPEG baseline, -xv/-xw JPEG 2000, -xr RLE)
_PROPOSE = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
            "1.2.840.10008.1.2.5": "-xr"}


def storescu(port: int, paths: list[Path], calling: str = "CAMERA", called: str = "FUNDUSRT") -> subprocess.CompletedProcess:
    """Send files with dcmtk storescu, one run per transfer syntax, proposing that syntax; the last failing run wins."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(syntax, "-xe"), []).append(path)
    result = None
    for flag, group in groups.items():
        proc = subprocess.run([dcmtk_storescu(), flag, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                               *map(str, group)], capture_output=True, text=True, timeout=120)
        if result is None or proc.returncode != 0:
            result = proc
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A pynetdicom Storage SCP standing in for the PACS: keeps every dataset it is sent."""

    def __init__(self) -> None:
        import pynetdicom

        self.datasets: list[Any] = []
        self._lock = threading.Lock()
        ae = pynetdicom.AE(ae_title="PACS")
        for cx in pynetdicom.StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, pynetdicom.ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self._on_store)])
        self.destination = Destination("PACS", "127.0.0.1", self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.datasets.append(ds)
        return 0

    def of_class(self, sop_class: str) -> list[Any]:
        with self._lock:
            return [ds for ds in self.datasets if ds.SOPClassUID == sop_class]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package("internvit-shuffle", seed=1)[1]


def processor(package: Path) -> Any:
    from fundusrt.runtime.pipeline import load_package

    pipe = load_package(package, threads=1)
    return lambda study_dir: pipe.run_study(study_dir, gen=GEN)


def audit_events(spool: Path, event: str) -> list[str]:
    lines = (spool / "audit.log").read_text().splitlines() if (spool / "audit.log").exists() else []
    return [r["study_instance_uid"] for r in map(json.loads, lines) if r["event"] == event]


def small_study(out: Path, seed: int) -> Any:
    return write_study(out, seed=seed, size=(256, 256))


# ---------------------------------------------------------------- state machine (fast)

def test_state_machine(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.sqlite")
    assert state.add_instance("1.2.3", "1.2.3.1", "a", now=100.0)
    assert not state.add_instance("1.2.3", "1.2.3.1", "a", now=101.0)  # duplicate SOP instance
    assert state.add_instance("1.2.3", "1.2.3.2", "b", now=102.0)
    assert state.claim_due(quiet_seconds=5, now=104.0) == []  # not quiet yet
    (claimed,) = state.claim_due(quiet_seconds=5, now=108.0)
    assert claimed.state == PROCESSING and claimed.claimed_generation == 2
    assert state.recover() == ["1.2.3"] and state.study("1.2.3").state == RECEIVED  # crash while processing
    (claimed,) = state.claim_due(quiet_seconds=5, now=108.0)
    state.record_outputs("1.2.3", [("9.9.1", "out/SR.dcm")])
    assert state.study("1.2.3").state == SENDING and state.recover() == []  # sending survives a restart
    assert not state.add_instance("1.2.3", "9.9.1", "x")  # our own result coming back
    assert state.add_instance("1.2.3", "1.2.3.3", "c", now=109.0)  # arrives during the run
    assert state.finish("1.2.3") == RECEIVED  # so the study runs again
    (claimed,) = state.claim_due(quiet_seconds=5, now=120.0)
    assert claimed.runs == 3 and state.finish("1.2.3") == DONE
    assert state.claim_due(quiet_seconds=0, now=1e12) == []  # done is never picked up again
    state.close()


def test_failed_run_with_new_instances_runs_again(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.sqlite")
    state.add_instance("1.9", "1.9.1", "a", now=1.0)
    state.claim_due(quiet_seconds=0, now=2.0)
    state.add_instance("1.9", "1.9.2", "b", now=3.0)  # arrives while the failing run is in progress
    assert state.fail("1.9", "model error") == RECEIVED
    state.claim_due(quiet_seconds=0, now=4.0)
    assert state.fail("1.9", "model error again") == FAILED  # nothing new: it stays failed
    state.close()


def test_config_defaults_are_safe(tmp_path: Path) -> None:
    config = NodeConfig(spool=tmp_path, output_dir=tmp_path / "out")
    assert config.host == "127.0.0.1" and config.max_associations >= 1 and config.max_dataset_bytes > 0
    with pytest.raises(NodeConfigError, match="nowhere"):
        NodeConfig(spool=tmp_path)
    with pytest.raises(NodeConfigError, match="AET@host:port"):
        Destination.parse("PACS:4242")
    with pytest.raises(NodeConfigError, match="private key"):
        NodeConfig(spool=tmp_path, output_dir=tmp_path, tls_cert=tmp_path / "c.pem")


def test_allow_list_and_size_limit(tmp_path: Path) -> None:
    def never(study_dir: Path) -> Any:
        raise AssertionError("nothing should be processed")

    study = small_study(tmp_path / "study", seed=1)
    config = NodeConfig(spool=tmp_path / "spool", port=0, output_dir=tmp_path / "out", quiet_seconds=3600,
                        allowed_calling_aets=("CAMERA",), max_dataset_bytes=5000)
    node = Node(config, never)
    node.start()
    try:
        refused = storescu(node.port, study.files[:1], calling="INTRUDER")
        assert refused.returncode != 0 and "calling ae title not recognized" in (refused.stdout + refused.stderr).lower()
        too_big = storescu(node.port, study.files[:1], calling="CAMERA")
        assert too_big.returncode != 0  # storescu exits non-zero when a C-STORE is refused
        assert node.state.studies() == [] and not any((tmp_path / "spool" / "incoming").rglob("*.dcm"))
    finally:
        node.stop()


# ---------------------------------------------------------------- end to end (slow: needs the tiny package)

@pytest.mark.slow
def test_storescu_study_is_processed_once_and_results_come_back(package: Path, receiver: Receiver,
                                                                 tmp_path: Path) -> None:
    import logging

    study = small_study(tmp_path / "study", seed=4)
    spool, out = tmp_path / "spool", tmp_path / "out"
    log_file = tmp_path / "node.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # everything, pynetdicom included, goes to the grepped file
    config = NodeConfig(spool=spool, port=0, quiet_seconds=3.0, destination=receiver.destination, output_dir=out,
                        write_pdf=True, poll_seconds=0.1)
    node = Node(config, processor(package))
    node.start()
    try:
        sent = storescu(node.port, study.files)
        assert sent.returncode == 0, sent.stderr
        assert node.wait_until_idle(120), node.state.studies()
        (row,) = node.state.studies()
        assert row.state == DONE and row.study_uid == study.study_instance_uid
        assert len(node.state.instance_paths(study.study_instance_uid)) == len(study.files)
        # Received instances are byte-for-byte what storescu sent (same UIDs, all transfer syntaxes).
        for path in study.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            spooled = pydicom.dcmread(spool / "incoming" / study.study_instance_uid / f"{ds.SOPInstanceUID}.dcm")
            assert spooled.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            assert spooled.PixelData == pydicom.dcmread(path).PixelData
        (sr,) = receiver.of_class(COMPREHENSIVE_SR)
        assert sr.StudyInstanceUID == study.study_instance_uid and sr.PatientID == study.patient_id
        assert len(list((out / study.study_instance_uid).glob("SR_*.dcm"))) == 1
        assert len(list((out / study.study_instance_uid).glob("PDF_*.dcm"))) == 1

        # The same study again, and our own results coming back: both ignored.
        assert storescu(node.port, study.files).returncode == 0
        own_results = sorted((out / study.study_instance_uid).glob("SC_*.dcm"))
        if own_results:
            assert storescu(node.port, own_results).returncode == 0
        time.sleep(1.5)
        assert node.state.study(study.study_instance_uid).runs == 1
        assert audit_events(spool, "processed") == [study.study_instance_uid]
        assert audit_events(spool, "received") == [study.study_instance_uid]
        assert len(receiver.of_class(COMPREHENSIVE_SR)) == 1
    finally:
        node.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    from tests.test_dicom_results import dciodvfy_errors

    assert dciodvfy_errors(next((out / study.study_instance_uid).glob("SR_*.dcm"))) == []
    # No patient name or ID in the logs or the audit trail; UIDs are there.
    for text in (log_file.read_text(errors="replace"), (spool / "audit.log").read_text()):
        assert study.study_instance_uid in text
        for phi in (study.patient_name, study.patient_id, study.patient_name.replace("^", " ")):
            assert phi not in text


CHILD = """
import json, sys, threading, time
from pathlib import Path
from fundusrt.config import GenerationConfig
from fundusrt.node import Destination, Node, NodeConfig
from fundusrt.runtime.pipeline import load_package
a = json.loads(sys.argv[1])
pipe = load_package(a["package"], threads=1)
def process(study_dir):
    Path(a["marker"]).write_text(study_dir.name)
    time.sleep(a["delay"])
    return pipe.run_study(study_dir, gen=GenerationConfig(max_new_tokens=6))
node = Node(NodeConfig(spool=a["spool"], port=a["port"], quiet_seconds=2.0, poll_seconds=0.1,
                       destination=Destination(*a["dest"])), process)
node.start()
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.mark.slow
def test_kill_9_resumes_every_acknowledged_study_exactly_once(package: Path, receiver: Receiver,
                                                               tmp_path: Path) -> None:
    spool, marker, port = tmp_path / "spool", tmp_path / "marker", free_port()
    first, second = small_study(tmp_path / "a", seed=7), small_study(tmp_path / "b", seed=8)
    dest = receiver.destination

    def start(delay: float) -> subprocess.Popen:
        args = json.dumps({"package": str(package), "spool": str(spool), "port": port, "marker": str(marker),
                           "delay": delay, "dest": [dest.ae_title, dest.host, dest.port]})
        proc = subprocess.Popen([sys.executable, "-c", CHILD, args], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    node = start(delay=60)
    try:
        assert storescu(port, first.files).returncode == 0
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == first.study_instance_uid
        assert storescu(port, second.files).returncode == 0  # acknowledged while the first is processing
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait()
    with sqlite3.connect(spool / "state.sqlite") as db:
        states = dict(db.execute("SELECT study_uid, state FROM studies"))
    assert states == {first.study_instance_uid: PROCESSING, second.study_instance_uid: RECEIVED}

    node = start(delay=0)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sqlite3.connect(spool / "state.sqlite") as db:
                if {s for (s,) in db.execute("SELECT state FROM studies")} == {DONE}:
                    break
            time.sleep(0.2)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait()
    assert sorted(audit_events(spool, "processed")) == sorted([first.study_instance_uid, second.study_instance_uid])
    assert audit_events(spool, "resumed") == [first.study_instance_uid]
    srs = receiver.of_class(COMPREHENSIVE_SR)
    assert sorted(sr.StudyInstanceUID for sr in srs) == sorted([first.study_instance_uid, second.study_instance_uid])


ORTHANC_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] ~= 'Lua' and tags['Modality'] == 'OP' then
    SendToModality(instanceId, 'fundusrt')
  end
end
"""


@pytest.mark.slow
def test_orthanc_forwards_to_the_node_and_gets_the_sr_back(package: Path, tmp_path: Path) -> None:
    orthanc = shutil.which("Orthanc")
    if orthanc is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    study = write_study(tmp_path / "study", seed=11, variants=("op",), size=(256, 256))
    dicom_port, http_port = free_port(), free_port()
    node = Node(NodeConfig(spool=tmp_path / "spool", port=0, quiet_seconds=1.0, poll_seconds=0.1,
                           destination=Destination("ORTHANC", "127.0.0.1", dicom_port)), processor(package))
    node.start()
    (tmp_path / "forward.lua").write_text(ORTHANC_LUA)
    config = {"Name": "fundusrt-test", "StorageDirectory": str(tmp_path / "orthanc"),
              "IndexDirectory": str(tmp_path / "orthanc"), "DicomAet": "ORTHANC", "DicomPort": dicom_port,
              "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomModalities": {"fundusrt": ["FUNDUSRT", "127.0.0.1", node.port]},
              "LuaScripts": [str(tmp_path / "forward.lua")], "Plugins": []}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    server = subprocess.Popen([orthanc, str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "orthanc.log", "w"))
    base = f"http://127.0.0.1:{http_port}"

    def rest(path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if path != "/file" and not path.endswith("/file") else raw

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                rest("/system")
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "orthanc.log").read_text()[-2000:]
                time.sleep(0.2)
        assert storescu(dicom_port, study.files, called="ORTHANC").returncode == 0
        deadline, found = time.monotonic() + 120, []
        while not found and time.monotonic() < deadline:
            found = rest("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR",
                                                                          "StudyInstanceUID": study.study_instance_uid}})
            time.sleep(0.3)
        assert len(found) == 1, node.state.studies()
        sr = pydicom.dcmread(__import__("io").BytesIO(rest(f"/instances/{found[0]}/file")))
        assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.PatientID == study.patient_id
        evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
        assert evidence == set(study.instances)
    finally:
        server.terminate()
        server.wait(timeout=30)
        node.stop()


@pytest.mark.slow
def test_load_50_studies_from_parallel_storescu(package: Path, tmp_path: Path) -> None:
    rgb, _ = draw_fundus(random_case(3, 256, 256))
    batches: list[list[Path]] = [[] for _ in range(5)]
    studies = []
    for n in range(50):
        study_uid = generate_uid()
        path = tmp_path / "in" / f"{n:02d}.dcm"
        path.parent.mkdir(exist_ok=True)
        write_op_image(path, rgb, laterality="R", study_instance_uid=study_uid)
        batches[n % 5].append(path)
        studies.append(study_uid)
    out = tmp_path / "out"
    node = Node(NodeConfig(spool=tmp_path / "spool", port=0, quiet_seconds=1.0, poll_seconds=0.1, output_dir=out,
                           max_associations=8), processor(package))
    node.start()
    start = time.monotonic()
    try:
        senders = [subprocess.Popen([dcmtk_storescu(), "-aec", "FUNDUSRT", "127.0.0.1", str(node.port),
                                     *map(str, batch)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for batch in batches]
        assert all(p.wait(timeout=60) == 0 for p in senders), [p.stderr.read() for p in senders]
        assert node.wait_until_idle(90)
    finally:
        node.stop()
    elapsed = time.monotonic() - start
    assert sorted(audit_events(tmp_path / "spool", "processed")) == sorted(studies)  # 0 lost, each once
    assert all(len(list((out / uid).glob("SR_*.dcm"))) == 1 for uid in studies)
    assert elapsed < 90, f"50 studies took {elapsed:.1f} s"
    print(f"50 studies received and processed in {elapsed:.1f} s")


def test_watch_folder_ingests_settled_files_once_and_leaves_them(tmp_path: Path) -> None:
    from fundusrt.node.watch import FolderWatcher

    study = small_study(tmp_path / "watched", seed=2)
    before = {p: p.read_bytes() for p in study.files}
    node = Node(NodeConfig(spool=tmp_path / "spool", port=None, watch_dir=tmp_path / "watched",
                           output_dir=tmp_path / "out", quiet_seconds=3600), lambda d: None)
    watcher = FolderWatcher(tmp_path / "watched", node.ingest, poll_seconds=0.1)
    assert watcher.scan_once() == 0  # first sight: wait for the files to settle
    assert watcher.scan_once() == len(study.files) + 1  # the DICOM files and ground_truth.json
    assert watcher.scan_once() == 0  # nothing new
    assert sorted(p.stem for p in node.state.instance_paths(study.study_instance_uid)) == sorted(study.instances)
    restarted = FolderWatcher(tmp_path / "watched", node.ingest, poll_seconds=0.1)  # a restart re-reads files...
    restarted.scan_once()
    restarted.scan_once()
    assert node.state.study(study.study_instance_uid).generation == len(study.files)  # ...but adds no duplicate
    assert {p: p.read_bytes() for p in study.files} == before  # sources never modified
    node.state.close()
