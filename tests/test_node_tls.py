"""TLS on the DICOM node, against pynetdicom peers using contexts built here with the ssl module.

A throw-away CA, server and client certificates are made in tmp_path with `cryptography`. Covered:
the SCP over TLS (C-ECHO, C-STORE), refusal of clients with no certificate, an untrusted one, or no TLS;
a silent client not stalling the others; the sender over TLS (host name checked, client certificate
presented); and a whole study received and its results sent back, both over TLS, with a model-free
report (the synth ground truth) so the test needs no exported package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from fundusrt.node import Destination, Node, NodeConfig, NodeConfigError
from fundusrt.node.sender import SendError, client_tls_context, send_files
from fundusrt.node.state import DONE
from fundusrt.synth import write_study

pytest.importorskip("cryptography", reason="certificates for the TLS tests are made with cryptography")
pynetdicom = pytest.importorskip("pynetdicom")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

VERIFICATION = "1.2.840.10008.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


# ---------------------------------------------------------------- certificates

@dataclass(frozen=True)
class Pki:
    """PEM files of one CA and the certificates it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _issue(folder: Path, stem: str, subject: str, ca_key: Any, ca_name: x509.Name, *, is_ca: bool = False,
           usage: x509.ObjectIdentifier | None = None, hosts: tuple[str, ...] = ()) -> tuple[Path, Path, Any]:
    """A certificate for `subject` signed by `ca_key` (self-signed when `ca_key` is None); (cert, key, key obj)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    if hosts:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key or key, hashes.SHA256())
    cert_path = folder / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(key, folder / f"{stem}.key"), key


def make_pki(folder: Path, name: str, server_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Pki:
    """A CA named `name`, a server certificate for `server_hosts` and a client certificate, all signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, _, ca_key = _issue(folder, "ca", f"{name} CA", None, None, is_ca=True)
    ca_name = _name(f"{name} CA")
    server_cert, server_key, _ = _issue(folder, "server", f"{name} server", ca_key, ca_name,
                                        usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=server_hosts)
    client_cert, client_key, _ = _issue(folder, "client", f"{name} client", ca_key, ca_name,
                                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "clinic")


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates from a CA the node does not trust."""
    return make_pki(tmp_path_factory.mktemp("rogue"), "rogue")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Seed 5 gives lesion boxes in both eyes, so the results include captures as well as the SR.
    return write_study(tmp_path_factory.mktemp("study"), seed=5, variants=("op",), transfer_syntaxes=("explicit-le",),
                       size=(256, 256))


# ---------------------------------------------------------------- peers

def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """What a TLS-capable camera would use, straight from the ssl module (not the code under test)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def associate(port: int, tls: ssl.SSLContext | None, sop_classes: tuple[str, ...] = (VERIFICATION,)) -> Any:
    ae = pynetdicom.AE(ae_title="CAMERA")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    return ae.associate("127.0.0.1", port, ae_title="FUNDUSRT",
                        tls_args=(tls, "127.0.0.1") if tls is not None else None)


def never(study_dir: Path) -> Any:
    raise AssertionError("nothing should be processed in this test")


@pytest.fixture
def tls_node(pki: Pki, tmp_path: Path) -> Any:
    node = Node(NodeConfig(spool=tmp_path / "spool", port=0, output_dir=tmp_path / "out", quiet_seconds=3600,
                           tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca), never)
    node.start()
    yield node
    node.stop()


class TlsReceiver:
    """A PACS that only speaks TLS and requires a client certificate signed by `pki.ca`."""

    def __init__(self, pki: Pki) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        context.verify_mode = ssl.CERT_REQUIRED
        self.datasets: list[Any] = []
        self._lock = threading.Lock()
        ae = pynetdicom.AE(ae_title="PACS")
        for cx in pynetdicom.StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, pynetdicom.ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=context,
                                      evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self._on_store)])
        self.destination = Destination("PACS", "127.0.0.1", self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.datasets.append(event.dataset)
        return 0

    def of_class(self, sop_class: str) -> list[Any]:
        with self._lock:
            return [ds for ds in self.datasets if ds.SOPClassUID == sop_class]


@pytest.fixture
def tls_receiver(pki: Pki) -> Any:
    receiver = TlsReceiver(pki)
    yield receiver
    receiver.server.shutdown()


# ---------------------------------------------------------------- the SCP over TLS

def test_echo_and_store_over_tls_with_a_client_certificate(tls_node: Node, pki: Pki, study: Any) -> None:
    ds = pydicom.dcmread(study.files[0])
    assoc = associate(tls_node.port, client_context(pki.ca, pki.client_cert, pki.client_key),
                      (VERIFICATION, str(ds.SOPClassUID)))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    (spooled,) = tls_node.state.instance_paths(study.study_instance_uid)
    assert pydicom.dcmread(spooled).PixelData == ds.PixelData


@pytest.mark.parametrize("client", ["no certificate", "untrusted certificate", "no TLS"])
def test_clients_without_a_trusted_certificate_are_refused(tls_node: Node, pki: Pki, rogue: Pki, study: Any,
                                                           client: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fundusrt.node")
    tls = {"no certificate": client_context(pki.ca),
           "untrusted certificate": client_context(pki.ca, rogue.client_cert, rogue.client_key),
           "no TLS": None}[client]
    assoc = associate(tls_node.port, tls)
    if assoc.is_established:  # TLS 1.3 reports a refused client certificate only at the first read
        status = assoc.send_c_echo()
        assoc.abort()
        assert not status, f"{client}: the node answered C-ECHO with {status}"
    assert tls_node.state.studies() == []
    deadline = time.monotonic() + 5  # the node logs from its connection thread, maybe after the client gave up
    while not any("refused a TLS connection" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)
    # The node still serves a proper client afterwards.
    good = associate(tls_node.port, client_context(pki.ca, pki.client_cert, pki.client_key))
    assert good.is_established
    assert good.send_c_echo().Status == 0x0000
    good.release()


def test_a_silent_client_does_not_stall_the_others(tls_node: Node, pki: Pki) -> None:
    silent = socket.create_connection(("127.0.0.1", tls_node.port))  # connects, never starts the handshake
    try:
        time.sleep(0.3)  # let the node accept it first
        start = time.monotonic()
        assoc = associate(tls_node.port, client_context(pki.ca, pki.client_cert, pki.client_key))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - start < 5
    finally:
        silent.close()


def test_without_tls_ca_any_tls_client_is_served(pki: Pki, tmp_path: Path) -> None:
    node = Node(NodeConfig(spool=tmp_path / "spool", port=0, output_dir=tmp_path / "out", quiet_seconds=3600,
                           tls_cert=pki.server_cert, tls_key=pki.server_key), never)
    node.start()
    try:
        assoc = associate(node.port, client_context(pki.ca))
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        node.stop()


def test_tls_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    base = {"spool": tmp_path / "spool", "output_dir": tmp_path / "out"}
    with pytest.raises(NodeConfigError, match="tls_ca .* is not a file"):
        NodeConfig(**base, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=tmp_path / "missing.pem")
    with pytest.raises(NodeConfigError, match="no destination"):
        NodeConfig(**base, send_tls_ca=pki.ca)
    dest = Destination("PACS", "127.0.0.1", 104)
    with pytest.raises(NodeConfigError, match="send_tls_key"):
        NodeConfig(**base, destination=dest, send_tls_ca=pki.ca, send_tls_cert=pki.client_cert)
    with pytest.raises(NodeConfigError, match="only over TLS"):
        NodeConfig(**base, destination=dest, send_tls_cert=pki.client_cert, send_tls_key=pki.client_key)


# ---------------------------------------------------------------- the sender over TLS

def test_sender_over_tls(tls_receiver: TlsReceiver, pki: Pki, rogue: Pki, study: Any, tmp_path: Path) -> None:
    files = study.files[:1]
    dest = tls_receiver.destination
    assert send_files(files, dest, "FUNDUSRT", timeout=10,
                      tls=client_tls_context(pki.ca, pki.client_cert, pki.client_key)) == 1
    (received,) = tls_receiver.datasets
    assert received.SOPInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID

    with pytest.raises(SendError, match="TLS handshake"):  # the receiver requires our certificate
        send_files(files, dest, "FUNDUSRT", timeout=10, tls=client_tls_context(pki.ca))
    with pytest.raises(SendError, match="TLS handshake"):  # we do not trust the receiver's CA
        send_files(files, dest, "FUNDUSRT", timeout=10,
                   tls=client_tls_context(rogue.ca, pki.client_cert, pki.client_key))
    # A certificate that does not name the destination host is refused (host name checking is on).
    elsewhere = make_pki(tmp_path / "elsewhere", "elsewhere", server_hosts=("pacs.example",))
    wrong_host = TlsReceiver(elsewhere)
    try:
        with pytest.raises(SendError, match="TLS handshake"):
            send_files(files, wrong_host.destination, "FUNDUSRT", timeout=10,
                       tls=client_tls_context(elsewhere.ca, elsewhere.client_cert, elsewhere.client_key))
        assert wrong_host.datasets == []
    finally:
        wrong_host.server.shutdown()
    assert len(tls_receiver.datasets) == 1


def test_study_in_and_results_out_over_tls(tls_receiver: TlsReceiver, pki: Pki, study: Any, tmp_path: Path) -> None:
    from tests.test_dicom_results import report_from_truth

    def process(study_dir: Path) -> Any:
        # The model's stand-in: the answers a perfect model gives (see test_dicom_results).
        assert sorted(p.stem for p in study_dir.glob("*.dcm")) == sorted(study.instances)
        return report_from_truth(study)

    node = Node(NodeConfig(spool=tmp_path / "spool", port=0, quiet_seconds=1.0, poll_seconds=0.1,
                           tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca,
                           destination=tls_receiver.destination, send_tls_ca=pki.ca,
                           send_tls_cert=pki.client_cert, send_tls_key=pki.client_key), process)
    node.start()
    try:
        datasets = [pydicom.dcmread(p) for p in study.files]
        assoc = associate(node.port, client_context(pki.ca, pki.client_cert, pki.client_key),
                          tuple(sorted({str(ds.SOPClassUID) for ds in datasets})))
        assert assoc.is_established
        try:
            assert all(assoc.send_c_store(ds).Status == 0x0000 for ds in datasets)
        finally:
            assoc.release()
        assert node.wait_until_idle(60), node.state.studies()
        assert [s.state for s in node.state.studies()] == [DONE]
    finally:
        node.stop()
    (sr,) = tls_receiver.of_class(COMPREHENSIVE_SR)
    assert sr.StudyInstanceUID == study.study_instance_uid and sr.PatientID == study.patient_id
    captures = tls_receiver.of_class("1.2.840.10008.5.1.4.1.1.7")
    assert captures and {c.SourceImageSequence[0].ReferencedSOPInstanceUID for c in captures} <= set(study.instances)


def test_dcmtk_storescu_over_tls(tls_node: Node, pki: Pki, study: Any) -> None:
    from tests.test_node import dcmtk_storescu

    tool = dcmtk_storescu()
    base = [tool, "-aet", "CAMERA", "-aec", "FUNDUSRT", "+cf", str(pki.ca)]
    target = ["127.0.0.1", str(tls_node.port), str(study.files[0])]
    sent = subprocess.run([*base, "+tls", str(pki.client_key), str(pki.client_cert), *target],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert [p.stem for p in tls_node.state.instance_paths(study.study_instance_uid)] == [
        str(pydicom.dcmread(study.files[0], stop_before_pixels=True).SOPInstanceUID)]
    anonymous = subprocess.run([*base, "+tla", *target], capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0  # no client certificate: refused
