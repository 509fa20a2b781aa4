"""What runs in `localp2p run`: the wiring (run), the backend supervisor, failover, the
worker set and attacher, the backend's gRPC client. Start with :mod:`localp2p.server.run`."""
