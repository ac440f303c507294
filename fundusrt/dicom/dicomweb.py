"""DICOMweb for fundusrt: list studies (QIDO-RS), fetch them (WADO-RS), post results (STOW-RS).

The HTTP and multipart/related work is dicomweb-client's (the DICOMweb client of the highdicom
authors); this module adds what a screening run needs on top: retries of the connection as well as of
busy answers (urllib3's Retry on the requests session, the same for every transaction), QIDO paging as
a stream, instances written to files in their original transfer syntax, and one outcome per object
posted with the server's reason when it refused one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fundusrt._deps import require

# STOW-RS failure reasons (PS3.18 10.5.3, the C-STORE status codes of PS3.4 B.2.3)
_FAILURE_REASONS = {
    0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorised",
    0xA700: "out of resources", 0xA900: "data set does not match the SOP class", 0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
_RETRY_STATUS = (429, 502, 503, 504)  # busy or restarting: worth another try
_ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # WADO-RS: as stored, where the server allows


class DicomWebError(RuntimeError):
    """A DICOMweb server could not be reached or refused a request; the message says which and why."""


@dataclass(frozen=True)
class StowOutcome:
    """What happened to one object posted with STOW-RS: stored, or refused with the reason."""

    path: Path
    sop_instance_uid: str | None
    stored: bool
    reason: str = ""


class StowError(DicomWebError):
    """Some objects were not stored; `outcomes` holds one entry per object, refused ones with their reason."""

    def __init__(self, message: str, outcomes: list[StowOutcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


def connect(url: str, timeout: float = 60.0, retries: int = 4) -> Any:
    """A dicomweb-client `DICOMwebClient` for the service root `url` (e.g. http://pacs:8042/dicom-web).

    Args:
        url: the DICOMweb service root (http or https).
        timeout: seconds to connect and between bytes of an answer.
        retries: further tries after a refused or dropped connection or a busy answer (429, 502-504),
            with exponential back-off; STOW-RS posts are retried too (storing an instance again with the
            same SOP Instance UID does not duplicate it).

    Raises:
        DicomWebError: `url` is not an http(s) URL.
    """
    if not url.startswith(("http://", "https://")):
        raise DicomWebError(f"DICOMweb URL {url!r} must start with http:// or https:// (the service root, e.g. "
                            "http://pacs:8042/dicom-web)")
    dicomweb_client = require("dicomweb_client", "DICOMweb (QIDO-RS, WADO-RS, STOW-RS)")
    requests = require("requests")
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.5,
                  status_forcelist=_RETRY_STATUS, allowed_methods=None, raise_on_status=False)
    adapter = requests.adapters.HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    client = dicomweb_client.DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)  # one retry policy: the session's
    return client


def _failed(exc: Exception, what: str, url: str) -> DicomWebError:
    response = getattr(exc, "response", None)
    if response is not None:
        body = " ".join(response.text.split())[:300]
        return DicomWebError(f"{what} at {url} failed: HTTP {response.status_code} {response.reason}"
                             + (f": {body}" if body else ""))
    return DicomWebError(f"{what} at {url} failed: {type(exc).__name__}: {exc}")


def search_studies(client: Any, page_size: int = 500, filters: dict[str, str] | None = None) -> Iterator[str]:
    """Study Instance UIDs the server lists (QIDO-RS), one page at a time, so an archive is never held whole.

    Raises:
        DicomWebError: the server did not answer, or answered with an error.
    """
    offset = 0
    while True:
        try:
            page = client.search_for_studies(offset=offset, limit=page_size, fields=["StudyInstanceUID"],
                                             search_filters=filters)
        except Exception as exc:  # requests' and dicomweb-client's errors: one message that names the server
            raise _failed(exc, "QIDO-RS study search", client.base_url) from exc
        for study in page:
            uid = study.get("0020000D", {}).get("Value", [None])[0]
            if uid:
                yield str(uid)
        if len(page) < page_size:
            return
        offset += len(page)


def retrieve_study(client: Any, study_instance_uid: str, out_dir: Path) -> list[Path]:
    """Fetch every instance of a study (WADO-RS) into `out_dir`.

    The request asks for the transfer syntax each instance was stored in (``transfer-syntax=*``); a server
    may still send another one (Orthanc sends most as explicit VR little endian), which reads the same.

    Returns the files written, one per instance, numbered in the order the server sent them.

    Raises:
        DicomWebError: the server did not answer, or answered with an error.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for number, ds in enumerate(client.iter_study(study_instance_uid, media_types=_ANY_TRANSFER_SYNTAX)):
            path = out_dir / f"{number:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    except DicomWebError:
        raise
    except Exception as exc:
        raise _failed(exc, f"WADO-RS retrieval of study {study_instance_uid}", client.base_url) from exc
    return paths


def _reason(item: Any) -> str:
    code = int(item.get("FailureReason", -1))
    return f"0x{code:04X} {_FAILURE_REASONS.get(code, 'refused')}" if code >= 0 else "refused, no reason given"


def store_files(client: Any, paths: Sequence[Path]) -> list[StowOutcome]:
    """Post DICOM files in one STOW-RS request; returns one outcome per file, all stored.

    Raises:
        StowError: a file is not DICOM, or the server refused or did not acknowledge some objects; its
            `outcomes` say which and why, and its message lists them.
        DicomWebError: the server could not be reached, or refused the request as a whole without
            saying which object.
    """
    pydicom = require("pydicom")
    outcomes: dict[str, StowOutcome] = {}
    unreadable: list[StowOutcome] = []
    datasets = []
    for path in map(Path, paths):
        try:
            ds = pydicom.dcmread(path)
            uid = str(ds.SOPInstanceUID)
        except Exception as exc:  # not DICOM, or no SOP Instance UID: nothing a server could store
            unreadable.append(StowOutcome(path, None, False, f"not a DICOM object with a SOP Instance UID ({exc})"))
            continue
        datasets.append(ds)
        outcomes[uid] = StowOutcome(path, uid, False, "not acknowledged by the server")
    answer = None
    if datasets:
        try:
            answer = client.store_instances(datasets)
        except Exception as exc:
            response = getattr(exc, "response", None)
            answer = _dataset_from(response)
            if answer is None:  # nothing per object to report: the request as a whole failed
                raise _failed(exc, f"STOW-RS of {len(datasets)} object(s)", client.base_url) from exc
    for item in getattr(answer, "ReferencedSOPSequence", []):
        uid = str(item.ReferencedSOPInstanceUID)
        if uid in outcomes:
            outcomes[uid] = StowOutcome(outcomes[uid].path, uid, True)
    for item in getattr(answer, "FailedSOPSequence", []):
        uid = str(item.ReferencedSOPInstanceUID)
        if uid in outcomes:
            outcomes[uid] = StowOutcome(outcomes[uid].path, uid, False, _reason(item))
    result = unreadable + list(outcomes.values())
    refused = [o for o in result if not o.stored]
    if refused:
        raise StowError(f"STOW-RS to {client.base_url}: {len(refused)} of {len(result)} object(s) not stored: "
                        + "; ".join(f"{o.path.name}: {o.reason}" for o in refused), result)
    return result


def _dataset_from(response: Any) -> Any:
    """The STOW-RS answer (a data set in DICOM JSON) carried by an error response, None when it has none."""
    if response is None or not response.content:
        return None
    pydicom = require("pydicom")
    try:  # some servers (Orthanc) send the DICOM JSON of a refusal without a Content-Type
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # an error page that is not a DICOM JSON data set
        return None


def stow(url: str, paths: Sequence[Path], timeout: float = 60.0) -> list[StowOutcome]:
    """Post result files to the DICOMweb service at `url` (see `store_files`); for `--stow URL`."""
    return store_files(connect(url, timeout), paths)

