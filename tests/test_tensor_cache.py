"""Issue 2: `--cache-dir` turns on llama.cpp's rpc tensor cache; a reload does not re-send big weights."""

from __future__ import annotations

import pathlib

import pytest

from localp2p.genmodel import Shape, write_model
from localp2p.testing.cluster import CountingProxy, start_server, start_worker

#: llama.cpp hashes (and caches) only tensors above 10 MiB: F16 1024x5632 ffn tensors are 11 MiB.
CACHE_SHAPE = Shape(layers=2, embd=1024, ff=5632, tensor_type="f16")


@pytest.fixture(scope="module")
def big_tensor_models(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    models = tmp_path_factory.mktemp("models")
    write_model(models / "random.gguf", CACHE_SHAPE)
    (models / "random.yaml").write_text("name: random\ncontext_size: 512\nparameters:\n  model: random.gguf\n")
    return models


def test_cached_reload_sends_almost_nothing(tmp_path: pathlib.Path, big_tensor_models: pathlib.Path) -> None:
    cache = tmp_path / "rpc-cache"
    worker, endpoint = start_worker(tmp_path, None, "--cache-dir", str(cache), name="cache-worker")
    proxy = CountingProxy(endpoint)
    try:
        first = start_server(tmp_path, "--models-path", str(big_tensor_models), rpc_servers=[proxy.endpoint], name="first")
        first_bytes = proxy.to_target
        first.close()
        cached = sorted(cache.iterdir())
        assert len(cached) == 3 * CACHE_SHAPE.layers, cached  # ffn gate/up/down of each layer

        proxy.reset()
        second = start_server(tmp_path, "--models-path", str(big_tensor_models), rpc_servers=[proxy.endpoint], name="second")
        second_bytes = proxy.to_target
        try:
            assert second.chat("hello", max_tokens=4).status_code == 200
        finally:
            second.close()
        big = 3 * CACHE_SHAPE.layers * CACHE_SHAPE.embd * CACHE_SHAPE.ff * 2
        assert first_bytes > big, (first_bytes, big)
        assert second_bytes < first_bytes - 0.95 * big, (first_bytes, second_bytes)
    finally:
        proxy.close()
        worker.stop()
