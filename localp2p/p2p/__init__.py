"""libp2p networking for localp2p (py-libp2p 0.8.1, trio, Noise + Yamux + TCP)."""

from .identity import load_or_create_identity
from .node import P2PNode, open_node, remote_peer_id, serve_node

__all__ = [
    "P2PNode",
    "load_or_create_identity",
    "open_node",
    "remote_peer_id",
    "serve_node",
]
