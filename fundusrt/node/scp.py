"""The Storage SCP: accepts fundus photographs on every transfer syntax and hands each to the node.

An instance is acknowledged (status 0000) only after the ingest callback has written it to the
spool, fsync'd it and committed it to the state file.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

from fundusrt._deps import require
from fundusrt.node.config import NodeConfig

log = logging.getLogger("fundusrt.node")

# C-STORE statuses
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# ingest(data, too_large) -> status; `data` is the instance as a DICOM Part 10 file
IngestFn = Callable[[bytes], int]


def tls_context(config: NodeConfig) -> ssl.SSLContext | None:
    """A server-side TLS context from the node settings, or None when TLS is not configured."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    if config.tls_ca is not None:
        context.load_verify_locations(str(config.tls_ca))
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

    handlers = [(pynetdicom.evt.EVT_C_STORE, on_store)]
    server = ae.start_server((config.host, config.port or 0), block=False, evt_handlers=handlers,
                             ssl_context=tls_context(config))
    host, port = server.server_address[:2]
    log.info("storage SCP %s listening on %s:%d%s", config.ae_title, host, port,
             " (TLS)" if config.tls_cert else "")
    return server
