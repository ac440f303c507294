"""The Storage SCP: accepts fundus photographs on every transfer syntax and hands each to the node.

An instance is acknowledged (status 0000) only after the ingest callback has written it to the
spool, fsync'd it and committed it to the state file.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from fundusrt._deps import require
from fundusrt.node.config import NodeConfig, load_tls_files

log = logging.getLogger("fundusrt.node")

# C-STORE statuses
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# ingest(data) -> C-STORE status; `data` is the instance as a DICOM Part 10 file
IngestFn = Callable[[bytes], int]


class _ServerTLSContext(ssl.SSLContext):
    """Hands accepted sockets over before the TLS handshake.

    pynetdicom wraps each accepted socket in its single accept loop; a handshake there would let one
    client that connects and stays silent stall every other connection. With the handshake deferred,
    it runs in that connection's own thread (`handshake`), bounded by `handshake_timeout` (which then
    also bounds a peer that stalls in the middle of a message).
    """

    handshake_timeout: float = 30.0

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def handshake(event: Any) -> None:
    """EVT_CONN_OPEN handler: complete the deferred TLS handshake before pynetdicom reads.

    A refused client (no certificate, an untrusted one, no TLS at all) gets one warning line and its
    socket closed, which pynetdicom treats as a closed connection; left to pynetdicom's first read, the
    same failure is logged as an error with a traceback.
    """
    sock = event.assoc.dul.socket.socket
    if not isinstance(sock, ssl.SSLSocket):
        return
    try:
        sock.do_handshake()
    except OSError as exc:  # ssl.SSLError and timeouts included
        log.warning("refused a TLS connection from %s:%s: %s", *event.address[:2],
                    getattr(exc, "reason", None) or exc)
        sock.close()


def tls_context(config: NodeConfig) -> ssl.SSLContext | None:
    """A server-side TLS context from the node settings, or None when TLS is not configured."""
    if config.tls_cert is None:
        return None
    context = _ServerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_tls_files(context, config.tls_cert, config.tls_key, config.tls_ca, "tls")
    if config.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def accepted_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows, encapsulated (compressed) ones first.

    pynetdicom accepts the first of *our* syntaxes the sender proposed; a camera that proposes its
    JPEG file plus uncompressed fall-backs must get JPEG, or it would have to transcode (dcmtk
    storescu cannot, and transcoding a lossy image again loses more).
    """
    pynetdicom = require("pynetdicom", "the DICOM node")
    pydicom = require("pydicom")
    syntaxes = list(pynetdicom.ALL_TRANSFER_SYNTAXES)
    return sorted(syntaxes, key=lambda uid: not pydicom.uid.UID(uid).is_compressed)


def start_scp(config: NodeConfig, ingest: IngestFn) -> Any:
    """Start the SCP in background threads; returns pynetdicom's server (`.server_address`, `.shutdown()`)."""
    pynetdicom = require("pynetdicom", "the DICOM node")
    ae = pynetdicom.AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.require_calling_aet = list(config.allowed_calling_aets)
    for sop_class in config.accepted_sop_classes:
        ae.add_supported_context(sop_class, accepted_transfer_syntaxes())
    ae.add_supported_context(pynetdicom.sop_class.Verification)

    def on_store(event: Any) -> int:
        size = event.request.DataSet.getbuffer().nbytes
        if size > config.max_dataset_bytes:
            log.warning("refused instance %s: %d bytes is over the limit of %d bytes",
                        event.request.AffectedSOPInstanceUID, size, config.max_dataset_bytes)
            return OUT_OF_RESOURCES
        return ingest(event.encoded_dataset())

    handlers = [(pynetdicom.evt.EVT_C_STORE, on_store), (pynetdicom.evt.EVT_CONN_OPEN, handshake)]
    server = ae.start_server((config.host, config.port or 0), block=False, evt_handlers=handlers,
                             ssl_context=tls_context(config))
    host, port = server.server_address[:2]
    log.info("storage SCP %s listening on %s:%d%s", config.ae_title, host, port,
             " (TLS)" if config.tls_cert else "")
    return server
