"""`fundusrt serve`: run the DICOM node with a model package until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import time
from pathlib import Path

from fundusrt.node.config import Destination, NodeConfig, NodeConfigError
from fundusrt.node.review.cli import add_ui_options, authenticator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fundusrt serve`."""
    parser.add_argument("--package", required=True, type=Path, help="model package folder (manifest.json)")
    parser.add_argument("--spool", required=True, type=Path, help="folder for received studies, results, state, audit")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112; 0: any free port)")
    parser.add_argument("--no-scp", action="store_true", help="do not listen for DICOM (watch-folder only)")
    parser.add_argument("--ae-title", default="FUNDUSRT", help="our AE title (default FUNDUSRT)")
    parser.add_argument("--allow-calling-ae", action="append", default=[], metavar="AET",
                        help="accept associations only from this calling AE title (repeatable)")
    parser.add_argument("--max-associations", type=int, default=8)
    parser.add_argument("--max-dataset-mb", type=float, default=512.0, help="refuse larger instances (default 512)")
    parser.add_argument("--quiet-seconds", type=float, default=10.0,
                        help="process a study when nothing arrived for it for this long (default 10)")
    parser.add_argument("--send-to", type=Destination.parse, metavar="AET@HOST:PORT",
                        help="send results by C-STORE to this AE")
    parser.add_argument("--stow", metavar="URL", help="post results to this DICOMweb service root with STOW-RS")
    parser.add_argument("--out", type=Path, help="also write results into OUT/<StudyInstanceUID>/")
    parser.add_argument("--watch", type=Path, help="also ingest DICOM files appearing in this folder")
    parser.add_argument("--pdf", action="store_true", help="add an Encapsulated PDF report to the results")
    parser.add_argument("--tls-cert", type=Path, help="serve over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    parser.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA (PEM)")
    parser.add_argument("--send-tls-ca", type=Path,
                        help="send results over TLS, trusting destination certificates this CA signed (PEM)")
    parser.add_argument("--send-tls-cert", type=Path, help="our client certificate for sending over TLS (PEM)")
    parser.add_argument("--send-tls-key", type=Path, help="private key of --send-tls-cert (PEM)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length limit (128)")
    parser.add_argument("--backend", default="ort-cpu", help="runtime backend (default ort-cpu)")
    parser.add_argument("--threads", type=int, help="intra-op threads of the backend")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--ui", action="store_true",
                        help="also serve the review page (worklist, findings, grader sign-off; needs fundusrt[ui]), "
                             "over HTTPS with --tls-cert/--tls-key")
    parser.add_argument("--ui-host", default="127.0.0.1", help="address of the review page (default 127.0.0.1)")
    parser.add_argument("--ui-port", type=int, default=8080, help="port of the review page (default 8080; 0: any)")
    add_ui_options(parser)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The NodeConfig the command line describes."""
    return NodeConfig(
        spool=args.spool, host=args.host, port=None if args.no_scp else args.port, ae_title=args.ae_title,
        allowed_calling_aets=tuple(args.allow_calling_ae), max_associations=args.max_associations,
        max_dataset_bytes=int(args.max_dataset_mb * 1024 * 1024), quiet_seconds=args.quiet_seconds,
        destination=args.send_to, stow_url=args.stow, output_dir=args.out, watch_dir=args.watch, write_pdf=args.pdf,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, send_tls_ca=args.send_tls_ca,
        send_tls_cert=args.send_tls_cert, send_tls_key=args.send_tls_key,
    )


def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, then stop cleanly (0); 2 on bad settings, an unusable package or a failed start."""
    from fundusrt._deps import MissingDependencyError
    from fundusrt.config import GenerationConfig
    from fundusrt.manifest import PackageError
    from fundusrt.node.service import Node
    from fundusrt.runtime.backends.base import BackendError
    from fundusrt.runtime.pipeline import load_package

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    # The handler only records the signal: setting a threading.Event from a handler can deadlock when the
    # signal lands while the main thread holds that Event's lock. Installed first, so that a signal while
    # the package loads also ends the process cleanly.
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    try:
        config = config_from_args(args)
        auth = authenticator(args.ui_users) if args.ui else None  # a bad user list is said before the slow load
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
        pipeline = load_package(args.package, backend=args.backend, threads=args.threads)
    except (NodeConfigError, PackageError, BackendError, MissingDependencyError, ValueError) as exc:
        print(f"fundusrt serve: {exc}", file=sys.stderr)
        return 2
    if signals:
        return 0
    node = None
    try:
        node = Node(config, lambda study_dir: pipeline.run_study(study_dir, gen=gen))
        node.start()
        ui = start_ui(args, node, auth) if args.ui else None
    except (NodeConfigError, OSError, sqlite3.Error, MissingDependencyError) as exc:  # bad certificate, port in use
        if node is not None:
            node.stop()
        print(f"fundusrt serve: cannot start: {exc}", file=sys.stderr)
        return 2
    inputs = [f"DICOM on {config.host}:{node.port}{' (TLS)' if config.tls_cert else ''}"] if node.port else []
    inputs += [f"watching {config.watch_dir}"] if config.watch_dir is not None else []
    print(f"fundusrt serve: {config.ae_title} ready: {', '.join(inputs)}; spool {config.spool}", flush=True)
    if ui is not None:
        from fundusrt.node.review.cli import sign_in_line

        print(f"fundusrt serve: {sign_in_line(ui.review, ui.url)}", flush=True)
    while not signals:
        time.sleep(0.2)  # a signal cuts the sleep short only by running its handler, so poll the list
    print(f"fundusrt serve: {signal.Signals(signals[0]).name} received; stopping after the study in progress",
          flush=True)
    if ui is not None:
        ui.stop()
    node.stop()
    print("fundusrt serve: stopped", flush=True)
    return 0


def start_ui(args: argparse.Namespace, node: object, auth: object) -> object:
    """Start the review page over the running node (TLS and client certificates as the node's DICOM port).

    Raises:
        OSError: the port is in use; NodeConfigError: the TLS files are unusable.
    """
    from fundusrt.node.review.app import ReviewApp
    from fundusrt.node.review.server import ReviewServer
    from fundusrt.node.review.sources import NodeSource

    config = node.config  # type: ignore[attr-defined]
    review = ReviewApp(NodeSource(node), auth, args.ui_organization, secure_cookies=config.tls_cert is not None)
    server = ReviewServer(review, args.ui_host, args.ui_port, config.tls_cert, config.tls_key, config.tls_ca)
    server.start()
    return server


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fundusrt serve", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
