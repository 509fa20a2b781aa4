"""`--models-path`: LocalAI-style model YAML, bare GGUF files, and switching between models."""

from __future__ import annotations

import pathlib
import shutil

from localp2p.config import embedded_model_path, load_models
from localp2p.testing.cluster import start_server


def test_yaml_fields_are_read(tmp_path: pathlib.Path) -> None:
    (tmp_path / "chat.yaml").write_text(
        f"name: chat\ncontext_size: 1024\nthreads: 3\nf16: false\nrpc_servers: [10.0.0.1:50052]\n"
        f"parameters:\n  model: {embedded_model_path()}\n  temperature: 0\n  top_k: 7\n  max_tokens: 12\n"
    )
    model = load_models(tmp_path)["chat"]
    assert (model.context_size, model.threads, model.f16, model.rpc_servers) == (1024, 3, False, ("10.0.0.1:50052",))
    assert model.sampling == {"temperature": 0.0, "top_k": 7, "max_tokens": 12}


def test_two_models_and_switching(tmp_path: pathlib.Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(embedded_model_path(), models / "copy.gguf")
    (models / "greedy.yaml").write_text(
        f"name: greedy\ncontext_size: 512\nparameters:\n  model: {embedded_model_path()}\n  temperature: 0\n  max_tokens: 16\n"
    )
    server = start_server(tmp_path, "--models-path", str(models))
    try:
        ids = [m["id"] for m in server.http.get("/v1/models").json()["data"]]
        assert ids == ["greedy", "copy.gguf"]
        assert server.status()["model"] == "greedy"
        # YAML defaults apply: temperature 0 and max_tokens 16 without asking.
        one = server.http.post("/v1/completions", json={"model": "greedy", "prompt": "One, two,"}).json()
        two = server.http.post("/v1/completions", json={"model": "greedy", "prompt": "One, two,"}).json()
        assert one["choices"][0]["text"] == two["choices"][0]["text"]
        assert one["usage"]["completion_tokens"] <= 16
        # context_size from YAML bounds max_tokens.
        assert server.http.post("/v1/completions", json={"model": "greedy", "prompt": "x", "max_tokens": 600}).status_code == 400
        switched = server.http.post("/v1/completions", json={"model": "copy.gguf", "prompt": "One, two,", "max_tokens": 4})
        assert switched.status_code == 200, switched.text
        assert server.status()["model"] == "copy.gguf"
    finally:
        server.close()
