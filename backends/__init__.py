"""Backend processes spoken to over gRPC (proto/backend.proto)."""
