"""`fundusrt serve`, the real command, as a process: a study in by dcmtk storescu, the SR out, SIGTERM to stop.

The node runs a tiny exported package (built once for the module, about 30 s, hence the slow marks);
the settings errors need no package and run fast.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from fundusrt.node.state import DONE
from fundusrt.synth import write_study
from tests.test_dicom_results import dciodvfy_errors
from tests.test_node import dcmtk_storescu, storescu

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
READY = re.compile(r"^fundusrt serve: \S+ ready: (DICOM on (?P<host>[^:\s]+):(?P<port>\d+))?.*$", re.MULTILINE)


class Serve:
    """`python -m fundusrt.cli serve ...` with stdout and stderr in files (a pipe left unread could block it)."""

    def __init__(self, folder: Path, *args: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "serve.out", folder / "serve.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fundusrt.cli", "serve", *args], stdout=out,
                                         stderr=err, cwd=folder)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> re.Match:
        """The start-up line; fails with the node's stderr when it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.stdout)
            if match:
                return match
            assert self.proc.poll() is None, f"fundusrt serve exited with {self.proc.returncode}:\n{self.stderr}"
            time.sleep(0.1)
        raise AssertionError(f"fundusrt serve did not start within {timeout} s:\n{self.stderr}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package("internvit-shuffle", seed=1)[1]


def audit(spool: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (spool / "audit.log").read_text().splitlines()]


# ---------------------------------------------------------------- the whole command (slow: needs the package)

@pytest.mark.slow
def test_serve_receives_a_study_writes_the_sr_and_stops_on_sigterm(package: Path, tmp_path: Path) -> None:
    dcmtk_storescu()  # skip early when dcmtk is missing
    study = write_study(tmp_path / "study", seed=4, size=(256, 256))
    spool, out = tmp_path / "spool", tmp_path / "out"
    # storescu runs once per transfer syntax; on a loaded machine the gap between runs can pass 1 s, and the
    # node would rightly run the study before the rest arrives: the quiet period leaves room for that.
    serve = Serve(tmp_path / "node", "--package", str(package), "--spool", str(spool), "--out", str(out),
                  "--port", "0", "--quiet-seconds", "5", "--max-new-tokens", "6", "--threads", "1", "--pdf",
                  "--log-level", "DEBUG")
    try:
        ready = serve.wait_ready()
        assert ready["host"] == "127.0.0.1"  # loopback unless told otherwise
        sent = storescu(int(ready["port"]), study.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        results = out / study.study_instance_uid
        deadline = time.monotonic() + 90
        while not list(results.glob("report_*.json")) and time.monotonic() < deadline:  # the last file delivered
            assert serve.proc.poll() is None, serve.stderr
            time.sleep(0.2)
        (sr_path,) = results.glob("SR_*.dcm")
        assert len(list(results.glob("PDF_*.dcm"))) == 1
        assert serve.stop(signal.SIGTERM) == 0, serve.stderr
    finally:
        serve.kill()

    assert "Traceback" not in serve.stderr, serve.stderr
    assert serve.stdout.rstrip().endswith("fundusrt serve: stopped"), serve.stdout
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert sr.StudyInstanceUID == study.study_instance_uid and sr.PatientID == study.patient_id
    assert sr.SOPInstanceUID not in study.instances
    evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == set(study.instances)
    assert dciodvfy_errors(sr_path) == []
    # The state file closed cleanly and says done; the study ran once.
    with sqlite3.connect(spool / "state.sqlite") as db:
        assert list(db.execute("SELECT study_uid, state, runs FROM studies")) == [(study.study_instance_uid, DONE, 1)]
    events = [(r["event"], r["study_instance_uid"]) for r in audit(spool)]
    assert events.count(("processed", study.study_instance_uid)) == 1
    # Even at DEBUG, the node's own output carries UIDs, never the patient's name or ID.
    logs = serve.stdout + serve.stderr
    assert study.study_instance_uid in logs
    for phi in (study.patient_name, study.patient_id, study.patient_name.replace("^", " ")):
        assert phi not in logs


@pytest.mark.slow
def test_serve_stops_on_sigint_while_idle(package: Path, tmp_path: Path) -> None:
    (tmp_path / "watched").mkdir()
    serve = Serve(tmp_path / "node", "--package", str(package), "--spool", str(tmp_path / "spool"), "--no-scp",
                  "--watch", str(tmp_path / "watched"), "--out", str(tmp_path / "out"))
    try:
        ready = serve.wait_ready()
        assert ready["port"] is None and f"watching {tmp_path / 'watched'}" in ready.group(0)
        assert serve.stop(signal.SIGINT) == 0, serve.stderr
    finally:
        serve.kill()
    assert "Traceback" not in serve.stderr and "KeyboardInterrupt" not in serve.stderr, serve.stderr
    assert "SIGINT received" in serve.stdout


@pytest.mark.slow
def test_serve_reports_a_port_in_use(package: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        serve = Serve(tmp_path / "node", "--package", str(package), "--spool", str(tmp_path / "spool"),
                      "--port", str(taken.getsockname()[1]), "--out", str(tmp_path / "out"))
        try:
            assert serve.proc.wait(timeout=60) == 2
        finally:
            serve.kill()
    assert "fundusrt serve: cannot start:" in serve.stderr and "Traceback" not in serve.stderr, serve.stderr


# ---------------------------------------------------------------- bad settings (fast: fail before loading a model)

@pytest.mark.parametrize(("extra", "message"), [
    ([], "manifest.json not found"),
    (["--tls-cert", "cert.pem"], "private key"),
    (["--allow-calling-ae", "BACK\\SLASH"], "not a valid AE title"),
])
def test_serve_rejects_bad_settings_with_a_message(tmp_path: Path, extra: list[str], message: str) -> None:
    serve = Serve(tmp_path / "node", "--package", str(tmp_path / "no-package"), "--spool", str(tmp_path / "spool"),
                  "--out", str(tmp_path / "out"), *extra)
    try:
        assert serve.proc.wait(timeout=60) == 2
    finally:
        serve.kill()
    assert message in serve.stderr and "Traceback" not in serve.stderr, serve.stderr
    assert not (tmp_path / "spool").exists()  # nothing created on the way out
