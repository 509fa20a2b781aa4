"""HTTP API: OpenAI-compatible routes and the operator endpoints."""

from localp2p.api.app import create_app

__all__ = ["create_app"]
