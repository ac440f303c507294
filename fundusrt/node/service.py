"""The node: ingest (SCP and watch folder) -> durable spool -> quiet-period scheduler -> process -> deliver."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.node.audit import AuditLog
from fundusrt.node.config import NodeConfig
from fundusrt.dicom.results import write_results
from fundusrt.node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, start_scp
from fundusrt.node.sender import SendError, client_tls_context, send_files, stow_files
from fundusrt.node.spool import Spool, SpoolError, durable_write
from fundusrt.node.state import DONE, FAILED, SENDING, StateStore
from fundusrt.node.watch import FolderWatcher

log = logging.getLogger("fundusrt.node")

# process(study_dir) -> a StudyReport (or its JSON form); e.g. fundusrt.load_package(pkg).run_study
ProcessFn = Callable[[Path], Any]


def _reason(exc: BaseException) -> str:
    # Exception text from the reader and runtime names files and UIDs, not patients.
    return f"{type(exc).__name__}: {exc}"


class Node:
    """A DICOM node that runs every study it receives through `process` exactly once.

    Args:
        config: the settings (see NodeConfig).
        process: called with the spool folder of a quiet study; returns its StudyReport.
    """

    def __init__(self, config: NodeConfig, process: ProcessFn) -> None:
        self.config = config
        self.process = process
        # Built first: an unreadable certificate or key is reported at start-up, before any state is opened,
        # and not at the first delivery.
        self._send_tls = (client_tls_context(config.send_tls_ca, config.send_tls_cert, config.send_tls_key)
                          if config.send_tls_ca is not None else None)
        self.spool = Spool(config.spool)
        self.state = StateStore(self.spool.state_path)
        self.audit = AuditLog(self.spool.audit_path)
        self._server: Any = None
        self._watcher: FolderWatcher | None = None
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work_loop, name="fundusrt-worker", daemon=True)

    @property
    def port(self) -> int | None:
        """The port the SCP listens on (useful with port 0), None without an SCP."""
        return self._server.server_address[1] if self._server is not None else None

    def start(self) -> None:
        """Resume interrupted work, then start the SCP, the folder watcher and the worker."""
        for study_uid in self.state.recover():
            self.audit.write("resumed", study_uid, reason="interrupted while processing")
            log.warning("study %s was interrupted while processing; it will run again", study_uid)
        if self.config.port is not None:
            self._server = start_scp(self.config, self.ingest)
        if self.config.watch_dir is not None:
            self._watcher = FolderWatcher(self.config.watch_dir, self.ingest, self.config.poll_seconds)
            self._watcher.start()
        self._worker.start()

    def stop(self) -> None:
        """Stop receiving, let the current study finish, and close the state file."""
        if self._server is not None:
            self._server.shutdown()
        if self._watcher is not None:
            self._watcher.stop()
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join()
        self.state.close()

    def ingest(self, data: bytes) -> int:
        """Spool one instance (a DICOM Part 10 file) durably and record it; returns a C-STORE status."""
        pydicom = require("pydicom")
        if len(data) > self.config.max_dataset_bytes:
            log.warning("refused an instance of %d bytes (limit %d)", len(data), self.config.max_dataset_bytes)
            return OUT_OF_RESOURCES
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            study_uid, sop_uid, sop_class = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        except Exception as exc:  # not DICOM, or no UIDs: nothing we could ever process
            log.warning("refused an instance that is not readable DICOM with study/instance UIDs: %s",
                        type(exc).__name__)
            return CANNOT_UNDERSTAND
        if sop_class not in self.config.accepted_sop_classes:
            log.info("ignored instance %s of SOP class %s (not a fundus photograph class)", sop_uid, sop_class)
            return SUCCESS
        if self.state.is_known(sop_uid):
            log.info("ignored duplicate instance %s of study %s", sop_uid, study_uid)
            return SUCCESS
        try:
            path = self.spool.store(study_uid, sop_uid, data)
        except SpoolError as exc:
            log.warning("refused an instance: %s", exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("cannot spool instance %s of study %s: %s", sop_uid, study_uid, exc.strerror)
            return OUT_OF_RESOURCES
        try:
            first = self.state.study(study_uid)
            added = self.state.add_instance(study_uid, sop_uid, str(path))
        except Exception as exc:  # the instance is not recorded, so it must not be acknowledged
            log.error("cannot record instance %s of study %s: %s", sop_uid, study_uid, _reason(exc))
            return PROCESSING_FAILURE
        if added and (first is None or first.state in (DONE, FAILED)):
            self.audit.write("received", study_uid, first_instance=sop_uid)
        log.info("stored instance %s of study %s", sop_uid, study_uid)
        return SUCCESS

    def run_pending(self) -> int:
        """One scheduler pass: deliver studies left in ``sending``, then run quiet studies; returns studies handled."""
        handled = 0
        for study in self.state.studies(SENDING):
            # Back off after failed deliveries (1, 2, 4 ... s, at most a minute) so a PACS that is down is not hammered.
            if study.send_attempts and time.time() - study.updated < min(60.0, 2.0 ** (study.send_attempts - 1)):
                continue
            self._deliver(study.study_uid)
            handled += 1
        while not self._stop.is_set():
            claimed = self.state.claim_due(self.config.quiet_seconds)
            if not claimed:
                break
            self._run(claimed[0].study_uid, claimed[0].claimed_generation)
            handled += 1
        return handled

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait until every study is done or failed (tests, batch use); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            studies = self.state.studies()
            if studies and all(s.state in (DONE, FAILED) for s in studies):
                return True
            time.sleep(0.05)
        return False

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception:  # keep serving; the failing study is marked by _run/_deliver
                log.exception("scheduler pass failed; retrying")
            self._stop.wait(self.config.poll_seconds)

    def _run(self, study_uid: str, generation: int) -> None:
        start = time.perf_counter()
        try:
            report = self.process(self.spool.study_dir(study_uid))
            data = report.to_dict() if hasattr(report, "to_dict") else report
            results = write_results(data, self.spool.fresh_results_dir(study_uid, generation), self.config.write_pdf)
        except Exception as exc:  # one bad study must not stop the node
            state = self.state.fail(study_uid, _reason(exc))
            self.audit.write("failed", study_uid, stage="processing", reason=_reason(exc))
            log.error("study %s failed: %s%s", study_uid, _reason(exc),
                      "" if state == FAILED else "; newer instances arrived, running again")
            return
        outputs = [(r.sop_instance_uid or f"json:{study_uid}:{generation}", str(r.path)) for r in results.files]
        self.state.record_outputs(study_uid, outputs)
        self.audit.write("processed", study_uid, images=len(data["images"]), errors=len(data.get("errors", [])),
                         results=[r.path.name for r in results.files], left_out=len(results.warnings),
                         seconds=round(time.perf_counter() - start, 3))
        self._deliver(study_uid)

    def deliver_files(self, study_uid: str, paths: list[Path], dicom_paths: list[Path]) -> None:
        """Deliver files of a study wherever the node sends results: `paths` into the output folder, `dicom_paths`
        to the destination AE and the DICOMweb service (also used for the review page's sign-offs).

        Raises:
            SendError, OSError: a destination refused or could not be reached; nothing is retried here.
        """
        if self.config.output_dir is not None:
            target = self.config.output_dir / study_uid
            for path in paths:
                if not (target / path.name).exists():  # a resumed delivery must not rewrite a file
                    durable_write(target / path.name, path.read_bytes())
            self.audit.write("sent", study_uid, to=str(self.config.output_dir), files=len(paths))
        if self.config.destination is not None:
            sent = send_files(dicom_paths, self.config.destination, self.config.ae_title, tls=self._send_tls)
            dest = self.config.destination
            self.audit.write("sent", study_uid, to=f"{dest.ae_title}@{dest.host}:{dest.port}", instances=sent)
        if self.config.stow_url is not None:
            stored = stow_files(dicom_paths, self.config.stow_url)
            self.audit.write("sent", study_uid, to=self.config.stow_url, instances=stored)

    def _deliver(self, study_uid: str) -> None:
        outputs = self.state.outputs(study_uid)
        try:
            self.deliver_files(study_uid, [path for _, path in outputs],
                               [path for sop, path in outputs if not sop.startswith("json:")])
        except (SendError, OSError) as exc:
            attempts = self.state.count_send_attempt(study_uid, _reason(exc))
            log.warning("delivery of study %s failed (attempt %d of %d): %s", study_uid, attempts,
                        self.config.max_send_attempts, _reason(exc))
            if attempts >= self.config.max_send_attempts:
                self.state.fail(study_uid, _reason(exc))
                self.audit.write("failed", study_uid, stage="delivery", reason=_reason(exc))
            return
        state = self.state.finish(study_uid)
        log.info("study %s delivered%s", study_uid, "" if state == DONE else "; newer instances arrived, running again")

