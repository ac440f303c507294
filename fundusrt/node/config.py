"""Settings of the DICOM node, with safe defaults (loopback only, bounded sizes and associations)."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

# Storage SOP classes the node accepts: fundus photographs as cameras and PACS send them.
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
ACCEPTED_SOP_CLASSES = (OP_8BIT, OP_16BIT, VL_PHOTOGRAPHIC, SECONDARY_CAPTURE, MULTIFRAME_TRUE_COLOR_SC)
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


class NodeConfigError(ValueError):
    """A node setting is invalid; the message names it."""


def check_ae_title(title: str, what: str) -> str:
    """`title` stripped, if it is a valid AE title (1-16 printable ASCII characters, no backslash)."""
    if not _AE_TITLE.match(title or "") or not title.strip():
        raise NodeConfigError(f"{what} {title!r} is not a valid AE title (1-16 printable ASCII characters)")
    return title.strip()


def load_tls_files(context: ssl.SSLContext, cert: Path | None, key: Path | None, ca: Path | None,
                   prefix: str) -> None:
    """Load a certificate chain and a CA file into `context`; NodeConfigError naming the settings when unusable.

    Args:
        context: the context to load into.
        cert / key: certificate chain and its private key (None: the key is in the `cert` file).
        ca: CA certificates to trust for the peer's certificate.
        prefix: "tls" or "send_tls", the settings' prefix, for the message.
    """
    try:
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
    except ssl.SSLError as exc:
        raise NodeConfigError(f"{prefix}_cert {cert} and {prefix}_key {key} cannot be used ({exc.reason or exc}): "
                              "both must be PEM files and the key must belong to the certificate") from exc
    try:
        if ca is not None:
            context.load_verify_locations(str(ca))
    except ssl.SSLError as exc:
        raise NodeConfigError(f"{prefix}_ca {ca} cannot be used ({exc.reason or exc}): a PEM file of CA "
                              "certificates is expected") from exc


@dataclass(frozen=True)
class Destination:
    """Where results are sent by C-STORE."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@host:port``."""
        match = re.match(r"^(?P<aet>[^@]+)@(?P<host>[^:@]+):(?P<port>\d+)$", text)
        if not match:
            raise NodeConfigError(f"destination {text!r} must look like AET@host:port, e.g. PACS@127.0.0.1:4242")
        return cls(check_ae_title(match["aet"], "destination AE title"), match["host"], int(match["port"]))


@dataclass
class NodeConfig:
    """Everything `fundusrt serve` can be told.

    Attributes:
        spool: folder for received instances, results, state and audit log.
        host / port: where the Storage SCP listens (port None: no SCP, e.g. watch-folder only; 0: any free port).
        ae_title: our AE title (calling AE when sending, called AE when receiving).
        allowed_calling_aets: when non-empty, associations from other calling AE titles are rejected.
        max_associations: concurrent associations accepted.
        max_dataset_bytes: larger instances are refused (status A700) and not stored.
        quiet_seconds: a study is processed when no instance of it arrived for this long.
        destination: send results there by C-STORE.
        stow_url: post results to this DICOMweb service root with STOW-RS.
        output_dir: also (or instead) copy results into <output_dir>/<StudyInstanceUID>/.
        watch_dir: also ingest DICOM files that appear in this folder (never modified or deleted).
        write_pdf: add an Encapsulated PDF report to the results.
        tls_cert / tls_key / tls_ca: serve over TLS; with tls_ca, clients must present a certificate it signed.
        send_tls_ca: send results over TLS, trusting destination certificates this CA signed (the certificate
            must name the destination host, as a DNS name or IP address).
        send_tls_cert / send_tls_key: our client certificate for destinations that require one.
        max_send_attempts: deliveries tried before a study is marked failed.
        poll_seconds: how often the scheduler and the folder watcher look for work.
    """

    spool: Path
    host: str = "127.0.0.1"
    port: int | None = 11112
    ae_title: str = "FUNDUSRT"
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 8
    max_dataset_bytes: int = 512 * 1024 * 1024
    quiet_seconds: float = 10.0
    destination: Destination | None = None
    stow_url: str | None = None
    output_dir: Path | None = None
    watch_dir: Path | None = None
    write_pdf: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    send_tls_ca: Path | None = None
    send_tls_cert: Path | None = None
    send_tls_key: Path | None = None
    max_send_attempts: int = 5
    poll_seconds: float = 0.5
    accepted_sop_classes: tuple[str, ...] = field(default=ACCEPTED_SOP_CLASSES)

    def __post_init__(self) -> None:
        self.spool = Path(self.spool)
        self.ae_title = check_ae_title(self.ae_title, "ae_title")
        self.allowed_calling_aets = tuple(check_ae_title(a, "allowed calling AE title")
                                          for a in self.allowed_calling_aets)
        if self.port is not None and not 0 <= self.port <= 65535:
            raise NodeConfigError(f"port {self.port} is not a TCP port (0-65535)")
        for name in ("max_associations", "max_dataset_bytes", "max_send_attempts"):
            if getattr(self, name) < 1:
                raise NodeConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.quiet_seconds < 0 or self.poll_seconds <= 0:
            raise NodeConfigError("quiet_seconds must be >= 0 and poll_seconds > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise NodeConfigError("TLS needs both a certificate and its private key (tls_cert and tls_key)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise NodeConfigError("tls_ca (client certificate check) needs tls_cert and tls_key as well")
        if (self.send_tls_cert is None) != (self.send_tls_key is None):
            raise NodeConfigError("a client certificate for sending needs its private key (send_tls_cert and "
                                  "send_tls_key)")
        if self.send_tls_cert is not None and self.send_tls_ca is None:
            raise NodeConfigError("send_tls_cert is used only over TLS: give send_tls_ca, the CA that signed the "
                                  "destination's certificate")
        if self.send_tls_ca is not None and self.destination is None:
            raise NodeConfigError("send_tls_ca is set but there is no destination AE to send to")
        for name in ("tls_cert", "tls_key", "tls_ca", "send_tls_ca", "send_tls_cert", "send_tls_key"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
                if not Path(value).is_file():
                    raise NodeConfigError(f"{name} {value} is not a file (PEM certificate or key expected)")
        if self.port is None and self.watch_dir is None:
            raise NodeConfigError("nothing to receive from: give a port for the SCP or a folder to watch")
        if self.stow_url is not None and not self.stow_url.startswith(("http://", "https://")):
            raise NodeConfigError(f"stow_url {self.stow_url!r} must be an http:// or https:// DICOMweb service root")
        if self.destination is None and self.output_dir is None and self.stow_url is None:
            raise NodeConfigError("results would go nowhere: give a destination AE, a DICOMweb URL (STOW-RS), "
                                  "an output folder, or several")
