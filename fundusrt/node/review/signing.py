"""A grader's sign-off: written as SR (durably), recorded (committed), audited, then delivered in the background.

The page reports success only after the SR file and its directory are fsync'd and the SQLite row is
committed with synchronous=FULL. Delivery happens afterwards and is retried with a growing pause (up to
a minute) until it succeeds; the page shows its state. The AI's results are never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.dicom.signoff import build_signoff_sr
from fundusrt.dicom.sr import save_dataset
from fundusrt.node.sender import SendError
from fundusrt.node.spool import fsync_dir
from fundusrt.node.state import Signoff

log = logging.getLogger("fundusrt.review")


def sign_off(source: Any, study: Any, eyes: Mapping[str, Mapping[str, str]], grader: str, login: str,
             organization: str) -> Signoff:
    """Write, record and audit the sign-off of `study`'s AI result; returns the recorded row.

    Args:
        source: a `fundusrt.node.review.sources` source (state, audit, where to write).
        study: the `Study` signed off (its report and AI SR exist).
        eyes: per eye {"decision", "reason"}: the grader's decision; "confirmed" when it is the AI's.
        grader / login: the grader's name and login name.
        organization: the verifying organisation named in the SR.

    Raises:
        ResultWriteError: an eye is not in the report, a decision is unknown, an override has no reason.
        OSError, sqlite3.Error: the SR or the record could not be stored (nothing is reported as signed).
    """
    pydicom = require("pydicom")
    report_eyes = study.report["eyes"]
    signed = {}
    for eye, choice in eyes.items():
        ai = report_eyes[eye].get("decision") if eye in report_eyes else None
        signed[eye] = {"ai": ai, "decision": choice["decision"], "reason": choice.get("reason", "").strip(),
                       "action": "confirmed" if choice["decision"] == ai else "overridden"}
    ai_sr = pydicom.dcmread(study.ai_sr_path)
    sr = build_signoff_sr(ai_sr, signed, {eye: report_eyes[eye]["images"] for eye in signed if eye in report_eyes},
                          grader, login, organization)
    path = save_dataset(sr, source.signoff_path(study, sr.SOPInstanceUID))
    fsync_dir(path.parent)  # the new file's name is durable too before the page says "signed"
    record = Signoff(sr.SOPInstanceUID, study.study_uid, str(ai_sr.SOPInstanceUID), grader, time.time(), signed,
                     str(path), False, 0, "")
    source.state.add_signoff(record)
    source.audit.write("signed_off", study.study_uid, signoff_sop_instance_uid=record.signoff_uid,
                       ai_sr=record.ai_sr_uid, grader=login,
                       eyes={eye: {k: v[k] for k in ("ai", "decision", "action")} for eye, v in signed.items()})
    return record


class DeliveryWorker:
    """Delivers recorded sign-offs not yet delivered (also those left over from before a restart)."""

    def __init__(self, source: Any, poll_seconds: float = 0.5) -> None:
        self.source = source
        self.poll_seconds = poll_seconds
        self._next_try: dict[str, float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fundusrt-review-delivery", daemon=True)

    def start(self) -> None:
        """Start delivering."""
        self._thread.start()

    def wake(self) -> None:
        """Look for work now (a sign-off was just recorded)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the delivery in progress."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def deliver_pending(self) -> None:
        """One pass: try every undelivered sign-off whose pause after a failure is over."""
        now = time.monotonic()
        for signoff in self.source.state.signoffs(undelivered=True):
            if self._stop.is_set() or self._next_try.get(signoff.signoff_uid, 0.0) > now:
                continue
            try:
                self.source.deliver(signoff.study_uid, Path(signoff.path))
            except (SendError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.source.state.signoff_delivered(signoff.signoff_uid, reason)
                pause = min(60.0, 2.0 ** signoff.delivery_attempts)
                self._next_try[signoff.signoff_uid] = now + pause
                log.warning("sign-off %s of study %s not delivered (attempt %d; next in %.0f s): %s",
                            signoff.signoff_uid, signoff.study_uid, signoff.delivery_attempts + 1, pause, reason)
                continue
            self.source.state.signoff_delivered(signoff.signoff_uid)
            log.info("sign-off %s of study %s delivered", signoff.signoff_uid, signoff.study_uid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_pending()
            except Exception:  # keep delivering; the row keeps the failure
                log.exception("sign-off delivery pass failed; retrying")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
