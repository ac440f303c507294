"""C-STORE of result files to a destination AE (pynetdicom SCU)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from fundusrt._deps import require
from fundusrt.node.config import Destination, load_tls_files

log = logging.getLogger("fundusrt.node")
_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian


class SendError(RuntimeError):
    """The destination refused the association or an instance; the message says which and why."""


def client_tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS context for sending: trusts destination certificates `ca` signed, checks the host name.

    Args:
        ca: PEM file of the CA (or CAs) that signed the destination's certificate.
        cert / key: our client certificate and its key, for destinations that require one.

    Raises:
        NodeConfigError: a file is not usable PEM, or the key does not belong to the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # certificate and host name required; no system CAs
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_tls_files(context, cert, key, ca, "send_tls")
    return context


def send_files(paths: Sequence[Path], destination: Destination, calling_ae: str, timeout: float = 30.0,
               tls: ssl.SSLContext | None = None) -> int:
    """Send DICOM files in one association; returns how many were stored.

    Args:
        paths: DICOM files.
        destination: the receiving AE.
        calling_ae: our AE title.
        timeout: seconds for the association, each message and the network.
        tls: send over TLS with this context (see `client_tls_context`); the destination's certificate must
            name `destination.host`.

    Raises:
        SendError: association rejected/aborted, or a C-STORE status other than success or warning.
    """
    pynetdicom = require("pynetdicom", "sending results by C-STORE")
    pydicom = require("pydicom")
    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        return 0
    ae = pynetdicom.AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, list(_TRANSFER_SYNTAXES))
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=(tls, destination.host) if tls is not None else None)
    if not assoc.is_established:
        raise SendError(f"{destination.ae_title}@{destination.host}:{destination.port} did not accept an association "
                        f"from {calling_ae} (rejected, aborted or unreachable"
                        f"{'; or the TLS handshake failed: check the CA, certificates and host name' if tls else ''})")
    stored = 0
    try:
        for path, ds in zip(paths, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
                raise SendError(f"no C-STORE response for {ds.SOPInstanceUID} from {destination.ae_title} "
                                "(connection lost or timed out)")
            if code != 0x0000 and (code & 0xF000) != 0xB000:  # warnings (Bxxx) still mean stored
                raise SendError(f"{destination.ae_title} refused {ds.SOPInstanceUID} ({path.name}) "
                                f"with status 0x{code:04X}")
            stored += 1
    finally:
        assoc.release()
    log.info("sent %d instance(s) to %s@%s:%d", stored, destination.ae_title, destination.host, destination.port)
    return stored


def stow_files(paths: Sequence[Path], url: str, timeout: float = 30.0) -> int:
    """Post DICOM files to a DICOMweb service with STOW-RS; returns how many were stored.

    Raises:
        SendError: the service could not be reached or refused objects; the message names each refused
            object and the reason the service gave.
    """
    from fundusrt.dicom.dicomweb import DicomWebError, stow

    if not paths:
        return 0
    try:
        stored = len(stow(url, paths, timeout))
    except DicomWebError as exc:
        raise SendError(str(exc)) from exc
    log.info("stored %d instance(s) at %s (STOW-RS)", stored, url)
    return stored
