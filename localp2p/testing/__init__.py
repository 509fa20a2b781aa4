"""Helpers that run the real thing for the test suite and the benchmarks: `localp2p`
subprocesses, real ports and HTTP (cluster), hosts in network namespaces (netns).
They need the dev extras (httpx); nothing in the product imports them."""
