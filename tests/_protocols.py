"""Protocols for tests on tiny random packages."""

from __future__ import annotations

import json


def protocol_without_gradability() -> dict:
    """The shipped protocol without its gradability item: what tiny random packages carry as their own.

    A random model's P(gradable) would make most pictures ungradable and leave their items unscored.
    """
    from fundusrt.runtime.protocol import DEFAULT_PROTOCOL

    protocol = json.loads(DEFAULT_PROTOCOL.read_text())
    protocol["items"] = [item for item in protocol["items"] if item["role"] != "gradability"]
    return protocol
