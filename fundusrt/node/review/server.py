"""Run the review page with uvicorn in a background thread, on a socket bound before it starts (so a port
in use is reported at start-up, and port 0 gives a free port we can print)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.node.config import load_tls_files


def check_tls(cert: Path, key: Path | None, ca: Path | None) -> None:
    """Fail at start-up (NodeConfigError naming the settings) when the certificate files cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_tls_files(context, cert, key, ca, "tls")


class ReviewServer:
    """The review app served on `host`:`port` (HTTPS with `tls_cert`/`tls_key`; client certificates signed by
    `tls_ca` required when given, as for the node's DICOM port).

    Raises (from the constructor):
        OSError: the address cannot be bound (port in use, no such address).
        NodeConfigError: the TLS files are unusable.
    """

    def __init__(self, review: Any, host: str = "127.0.0.1", port: int = 8080, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_ca: Path | None = None) -> None:
        uvicorn = require("uvicorn", "the review page")
        self.review, self.host, self.tls = review, host, tls_cert is not None
        if tls_cert is not None:
            check_tls(tls_cert, tls_key, tls_ca)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise OSError(exc.errno, f"cannot listen for the review page on {host}:{port}: {exc.strerror}") from exc
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            review.asgi, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5,
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_ca) if tls_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_ca else ssl.CERT_NONE)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="fundusrt-review", daemon=True)

    @property
    def url(self) -> str:
        """Where the page is, e.g. http://127.0.0.1:8080/."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving (and delivering sign-offs); returns when the server accepts connections."""
        self.review.delivery.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the review page did not start on {self.host}:{self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving and delivering."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()
        self.review.delivery.stop()
