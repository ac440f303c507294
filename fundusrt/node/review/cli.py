"""`fundusrt review DIR`: the review page over results written by `fundusrt run --dicom-out DIR`."""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import time
from pathlib import Path

from fundusrt.node.config import Destination, NodeConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fundusrt review`."""
    parser.add_argument("dir", type=Path, nargs="?",
                        help="folder of results (report_*.json beside SR_*.dcm, as fundusrt run --dicom-out writes)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port of the page (default 8080; 0: any free port)")
    add_ui_options(parser, prefix="")
    parser.add_argument("--send-to", type=Destination.parse, metavar="AET@HOST:PORT",
                        help="also send sign-off SRs by C-STORE to this AE")
    parser.add_argument("--ae-title", default="FUNDUSRT", help="our AE title when sending (default FUNDUSRT)")
    parser.add_argument("--tls-cert", type=Path, help="serve over HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password (twice) and print the hash field of a --users line, then exit")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def add_ui_options(parser: argparse.ArgumentParser, prefix: str = "ui-") -> None:
    """The sign-in and sign-off options shared by `fundusrt review` and `fundusrt serve --ui`."""
    parser.add_argument(f"--{prefix}users", type=Path, metavar="FILE",
                        help="user list, one 'login:scrypt$...:Family^Given' a line (default: a token printed at "
                             "start-up)")
    parser.add_argument(f"--{prefix}organization", default="fundusrt review", metavar="NAME",
                        help="the clinic, named as verifying organisation in sign-off SRs")


def authenticator(users: Path | None) -> object:
    """Sign-in by the user list `users`, or by a start-up token without one (raises UsersFileError)."""
    from fundusrt.node.review.auth import Authenticator, load_users

    return Authenticator(load_users(users) if users is not None else None)


def sign_in_line(review: object, url: str) -> str:
    """The start-up line saying where the page is and how to sign in (with the token when there is one)."""
    token = review.auth.token  # type: ignore[attr-defined]
    how = f"sign in with your name and the token {token}" if token else "sign in with a login of the user list"
    return f"review page at {url} ({how})"


def main(args: argparse.Namespace) -> int:
    """Serve the page until SIGINT/SIGTERM (0); 2 on bad settings or a failed start."""
    from fundusrt._deps import MissingDependencyError
    from fundusrt.node.review.app import ReviewApp
    from fundusrt.node.review.auth import UsersFileError, hash_password
    from fundusrt.node.review.server import ReviewServer
    from fundusrt.node.review.sources import FolderSource

    if args.hash_password:
        first, second = getpass.getpass("password: "), getpass.getpass("again: ")
        if first != second or not first:
            print("fundusrt review: the passwords differ or are empty", file=sys.stderr)
            return 2
        print(hash_password(first))
        return 0
    if args.dir is None:
        print("fundusrt review: give the results folder (DIR)", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("fundusrt review: HTTPS needs both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    source = server = None
    try:
        auth = authenticator(args.users)
        source = FolderSource(args.dir, args.send_to, args.ae_title)
        review = ReviewApp(source, auth, args.organization, secure_cookies=args.tls_cert is not None)
        server = ReviewServer(review, args.host, args.port, args.tls_cert, args.tls_key)
        server.start()
    except (OSError, UsersFileError, NodeConfigError, MissingDependencyError) as exc:
        if source is not None:
            source.close()
        print(f"fundusrt review: cannot start: {exc}", file=sys.stderr)
        return 2
    print(f"fundusrt review: {sign_in_line(review, server.url)}; results from {args.dir}", flush=True)
    while not signals:
        time.sleep(0.2)
    server.stop()
    source.close()
    print("fundusrt review: stopped", flush=True)
    return 0
