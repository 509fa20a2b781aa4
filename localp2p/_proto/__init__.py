"""gRPC stubs generated from ``proto/backend.proto`` (``python -m localp2p._proto.generate``).

The generated modules are build outputs and are not committed; ``make install`` writes them.
"""
