"""The DICOM node behind `fundusrt serve`: receive studies, run them once each, send results back."""

from fundusrt.node.config import ACCEPTED_SOP_CLASSES, Destination, NodeConfig, NodeConfigError
from fundusrt.node.service import Node
from fundusrt.node.state import StateStore

__all__ = ["ACCEPTED_SOP_CLASSES", "Destination", "Node", "NodeConfig", "NodeConfigError", "StateStore"]
