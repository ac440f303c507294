"""The node's durable state: one SQLite file recording every acknowledged instance and each study's state.

Study states: ``received`` (instances arrived; waits for the quiet period) -> ``processing`` ->
``sending`` (results written and recorded; being delivered) -> ``done``; or ``failed`` (with a
reason). Every change is committed with ``synchronous=FULL`` before the node acts on it, so after a
crash or ``kill -9``:

- ``processing`` goes back to ``received``: the interrupted run recorded nothing, so the study runs
  again, once;
- ``sending`` stays: the recorded results (same SOP Instance UIDs) are delivered again, which a PACS
  treats as the same objects;
- ``done`` and ``failed`` are never picked up again, unless a new instance of the study arrives
  (then the study is run again with everything received).

`generation` counts the instances of a study; a run that finishes while newer instances arrived
puts the study back to ``received`` instead of ``done``.

The review page's sign-offs live in the same file (table ``signoffs``): one row per sign-off SR,
committed before the page reports success, with its delivery status; the AI's results are never changed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RECEIVED, PROCESSING, SENDING, DONE, FAILED = "received", "processing", "sending", "done", "failed"
STATES = (RECEIVED, PROCESSING, SENDING, DONE, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    claimed_generation INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS signoffs (
    signoff_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    ai_sr_uid TEXT NOT NULL,
    grader TEXT NOT NULL,
    signed REAL NOT NULL,
    eyes TEXT NOT NULL,
    path TEXT NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    delivery_reason TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class StudyState:
    """A row of the studies table."""

    study_uid: str
    state: str
    generation: int
    claimed_generation: int
    first_received: float
    last_received: float
    runs: int
    send_attempts: int
    reason: str
    updated: float


@dataclass(frozen=True)
class Signoff:
    """A grader's sign-off of a study's AI result (a row of the signoffs table).

    Attributes:
        signoff_uid: SOP Instance UID of the sign-off SR (written to `path`).
        ai_sr_uid: SOP Instance UID of the AI's SR it signs off.
        eyes: per eye ("R", "L", "unknown"): {"ai": AI decision, "decision": the grader's, "action":
            "confirmed" or "overridden", "reason": text}.
        delivered: the SR reached every place the node sends results.
    """

    signoff_uid: str
    study_uid: str
    ai_sr_uid: str
    grader: str
    signed: float
    eyes: dict[str, dict[str, str]]
    path: str
    delivered: bool
    delivery_attempts: int
    delivery_reason: str

    @classmethod
    def from_row(cls, row: tuple) -> Signoff:
        values = list(row)
        values[5], values[7] = json.loads(values[5]), bool(values[7])
        return cls(*values)


class StateStore:
    """Thread-safe access to the node's SQLite state file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _tx(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(sql, params).fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return rows

    def is_known(self, sop_uid: str) -> bool:
        """True when the instance was received before, or is one of our own results."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM instances WHERE sop_uid=? UNION SELECT 1 FROM outputs WHERE sop_uid=?",
                (sop_uid, sop_uid)).fetchone() is not None

    def add_instance(self, study_uid: str, sop_uid: str, path: str, now: float | None = None) -> bool:
        """Record an acknowledged instance; False (and nothing changed) when it is a duplicate or our own result."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                known = self._db.execute(
                    "SELECT 1 FROM instances WHERE sop_uid=? UNION SELECT 1 FROM outputs WHERE sop_uid=?",
                    (sop_uid, sop_uid)).fetchone()
                if known:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("INSERT INTO instances VALUES (?, ?, ?, ?)", (sop_uid, study_uid, path, now))
                self._db.execute(
                    "INSERT INTO studies (study_uid, state, generation, first_received, last_received, updated) "
                    "VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET "
                    "generation = generation + 1, last_received = excluded.last_received, updated = excluded.updated, "
                    "state = CASE WHEN state IN (?, ?) THEN ? ELSE state END, "
                    "reason = CASE WHEN state IN (?, ?) THEN '' ELSE reason END",
                    (study_uid, RECEIVED, now, now, now, DONE, FAILED, RECEIVED, DONE, FAILED))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return True

    def recover(self) -> list[str]:
        """After a restart: interrupted runs go back to ``received``; returns their study UIDs."""
        rows = self._tx("UPDATE studies SET state=?, updated=? WHERE state=? RETURNING study_uid",
                        (RECEIVED, time.time(), PROCESSING))
        return [r[0] for r in rows]

    def claim_due(self, quiet_seconds: float, now: float | None = None, limit: int = 1) -> list[StudyState]:
        """Move up to `limit` studies quiet for `quiet_seconds` from ``received`` to ``processing`` and return them."""
        now = time.time() if now is None else now
        rows = self._tx(
            "UPDATE studies SET state=?, claimed_generation=generation, runs=runs+1, updated=? WHERE study_uid IN "
            "(SELECT study_uid FROM studies WHERE state=? AND last_received<=? ORDER BY last_received LIMIT ?) "
            "RETURNING *", (PROCESSING, now, RECEIVED, now - quiet_seconds, limit))
        return [StudyState(*r) for r in rows]

    def record_outputs(self, study_uid: str, outputs: list[tuple[str, str]]) -> None:
        """Record the results of a run, (sop_uid, path) each, and move the study to ``sending``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                generation = self._db.execute("SELECT claimed_generation FROM studies WHERE study_uid=?",
                                              (study_uid,)).fetchone()[0]
                self._db.executemany("INSERT INTO outputs VALUES (?, ?, ?, ?)",
                                     [(sop, study_uid, path, generation) for sop, path in outputs])
                self._db.execute("UPDATE studies SET state=?, send_attempts=0, updated=? WHERE study_uid=?",
                                 (SENDING, time.time(), study_uid))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def outputs(self, study_uid: str) -> list[tuple[str, Path]]:
        """(sop_uid, path) of the results of the study's latest recorded run."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_uid, path FROM outputs WHERE study_uid=? AND generation="
                "(SELECT MAX(generation) FROM outputs WHERE study_uid=?) ORDER BY path", (study_uid, study_uid)).fetchall()
        return [(sop, Path(path)) for sop, path in rows]

    def finish(self, study_uid: str) -> str:
        """Mark a delivered study ``done``, or ``received`` again when instances arrived during the run."""
        rows = self._tx("UPDATE studies SET state = CASE WHEN generation > claimed_generation THEN ? ELSE ? END, "
                        "reason='', updated=? WHERE study_uid=? RETURNING state", (RECEIVED, DONE, time.time(), study_uid))
        return rows[0][0]

    def fail(self, study_uid: str, reason: str) -> str:
        """Mark a study ``failed`` with a reason (no PHI: callers pass UIDs and error text only); returns the state.

        When instances arrived during the failed run the study goes back to ``received`` instead: they may
        be what the run was missing, and nothing else would ever pick the study up again.
        """
        rows = self._tx("UPDATE studies SET state = CASE WHEN generation > claimed_generation THEN ? ELSE ? END, "
                        "reason=?, updated=? WHERE study_uid=? RETURNING state",
                        (RECEIVED, FAILED, reason[:2000], time.time(), study_uid))
        return rows[0][0]

    def count_send_attempt(self, study_uid: str, reason: str) -> int:
        """Note a failed delivery; returns the attempts so far."""
        rows = self._tx("UPDATE studies SET send_attempts=send_attempts+1, reason=?, updated=? WHERE study_uid=? "
                        "RETURNING send_attempts", (reason[:2000], time.time(), study_uid))
        return rows[0][0]

    def studies(self, state: str | None = None) -> list[StudyState]:
        """All studies, or those in `state`, oldest first."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM studies ORDER BY first_received").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM studies WHERE state=? ORDER BY first_received",
                                        (state,)).fetchall()
        return [StudyState(*r) for r in rows]

    def study(self, study_uid: str) -> StudyState | None:
        """One study's row, None when unknown."""
        with self._lock:
            row = self._db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return StudyState(*row) if row else None

    def instance_paths(self, study_uid: str) -> list[Path]:
        """Spool paths of every acknowledged instance of a study."""
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances WHERE study_uid=? ORDER BY path", (study_uid,)).fetchall()
        return [Path(r[0]) for r in rows]

    def add_signoff(self, signoff: Signoff) -> None:
        """Record a sign-off; committed with synchronous=FULL (on disk) when this returns."""
        self._tx("INSERT INTO signoffs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (signoff.signoff_uid, signoff.study_uid, signoff.ai_sr_uid, signoff.grader, signoff.signed,
                  json.dumps(signoff.eyes, ensure_ascii=False), signoff.path, int(signoff.delivered),
                  signoff.delivery_attempts, signoff.delivery_reason))

    def signoffs(self, study_uid: str | None = None, undelivered: bool = False) -> list[Signoff]:
        """Sign-offs, oldest first: all, a study's, and/or those not yet delivered."""
        where = [*(["study_uid=?"] if study_uid is not None else []), *(["delivered=0"] if undelivered else [])]
        with self._lock:
            rows = self._db.execute("SELECT * FROM signoffs" + (" WHERE " + " AND ".join(where) if where else "")
                                    + " ORDER BY signed", (() if study_uid is None else (study_uid,))).fetchall()
        return [Signoff.from_row(r) for r in rows]

    def signoff_delivered(self, signoff_uid: str, reason: str = "") -> None:
        """Mark a sign-off delivered, or, with a `reason`, count a failed delivery."""
        if reason:
            self._tx("UPDATE signoffs SET delivery_attempts=delivery_attempts+1, delivery_reason=? WHERE signoff_uid=?",
                     (reason[:2000], signoff_uid))
        else:
            self._tx("UPDATE signoffs SET delivered=1, delivery_reason='' WHERE signoff_uid=?", (signoff_uid,))
