"""The llama.cpp backend: a gRPC ``Backend`` service (proto/backend.proto) over llama-cpp-python.

One process serves one model at a time. The rpc-servers it spreads layers over are
registered with ggml once, when the first model is loaded, and stay for the life of
the process: a different set of workers means a new process (the supervisor in
``localp2p run`` owns that). llama.cpp aborts the process when a worker dies
mid-request; that is expected, and the supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pathlib
import queue
import resource
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from localp2p import cpumode
from localp2p._proto import backend_pb2 as pb
from localp2p._proto import backend_pb2_grpc as pb_grpc
from localp2p.config import RPC_SERVERS_ENV, ConfigError, check_gguf, parse_rpc_servers
from localp2p.llama import rpc
from localp2p.llama.layers import assign_layers

from . import structured
from .batching import END, ERROR, PROMPT_CHUNK, Job, ModelUnloaded, RequestError, Scheduler
from .chat_prompt import ChatPrompt
from .engine_thread import EngineThread
from .model_params import LoadLog, extra_buffer_types, output_layer_on_host, parallel_sequences, progress_callback
from .sampling import GrammarError, Sampler, SamplingParams
from .text_out import TextOutput

log = structlog.get_logger("backend")

#: Seconds between looks at whether a waiting request's client is still there.
REPLY_POLL = 1.0
#: Embeddings come from a second, CPU-only context of the same file: llama.cpp needs a
#: context created in embedding mode, and keeping it local sends nothing to workers.
EMBEDDING_GPU_LAYERS = 0


@dataclass
class DeviceState:
    endpoint: str
    memory_free: int = 0
    memory_total: int = 0
    layers: int = 0
    used: bool = False
    skipped_reason: str = ""


@dataclass
class LoadedModel:
    name: str
    options: Any  # pb.ModelOptions
    llm: Any  # llama_cpp.Llama
    layers_total: int
    layers_local: int
    scheduler: Scheduler
    chat: ChatPrompt | None  # None: the chat format cannot be rendered (chat requests are refused)
    chat_error: str = ""
    embedder: Any = None
    _end_tokens: list[int] | None = None

    def end_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary (for ``ignore_eos``)."""
        if self._end_tokens is None:
            import llama_cpp  # noqa: PLC0415

            vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
            self._end_tokens = [t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        return self._end_tokens


@dataclass
class BackendState:
    """Everything the service knows; guarded by ``lock`` (llama.cpp contexts are not thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    model: LoadedModel | None = None
    devices: list[DeviceState] = field(default_factory=list)
    registered: tuple[str, ...] | None = None
    error: str = ""
    # Model load progress, written by llama.cpp's progress callback, read by Status
    # (which answers from another gRPC thread while LoadModel holds ``lock``).
    loading: bool = False
    load_fraction: float = 0.0
    load_bytes_total: int = 0
    # Which CPU fast paths llama.cpp may use (fixed for the process, see localp2p.cpumode),
    # and whether it may put weights into extra buffer types (repacks; AMX if allowed).
    cpu_mode: cpumode.CpuMode = cpumode.CpuMode.DEFAULT
    extra_buffer_types: bool = True
    load_log: LoadLog = field(default_factory=LoadLog)
    decoded: bool = False  # a generation has started in this process (the crash failpoint's trigger)


def _request_scope(request_id: str) -> contextvars.Context:
    """A copy of the current context with ``request_id`` bound for structlog.

    Calls run in it (``Context.run``) so every log line of one request carries its id,
    including lines logged deep in helpers, without leaking it into the gRPC thread
    that serves the next call.
    """
    scope = contextvars.copy_context()
    if request_id:
        scope.run(structlog.contextvars.bind_contextvars, request_id=request_id)
    return scope


def _iterate_in(scope: contextvars.Context, replies: Generator[Any, None, None]) -> Iterator[Any]:
    """Drive the generator ``replies`` inside ``scope``, closing it there too."""
    try:
        while True:
            try:
                reply = scope.run(next, replies)
            except StopIteration:
                return
            yield reply
    finally:
        scope.run(replies.close)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    log.warning("request refused", code=code.name, reason=message)
    context.abort(code, message)


def _sampling_params(req: pb.PredictOptions, grammar: str, bans: list[int]) -> SamplingParams:
    """The request's sampler settings (llama.cpp's defaults where it left a field at 0)."""
    bias = {int(token): float(value) for token, value in req.LogitBias.items()}
    for token in bans:  # ignore_eos: no end-of-generation token can be drawn
        bias[token] = float("-inf")
    return SamplingParams(
        temperature=req.Temperature,
        top_p=req.TopP if req.TopP > 0 else 1.0,
        top_k=req.TopK if req.TopK > 0 else 40,
        min_p=req.MinP if req.MinP > 0 else 0.05,
        repeat_penalty=req.RepeatPenalty if req.RepeatPenalty > 0 else 1.0,
        presence_penalty=req.PresencePenalty,
        frequency_penalty=req.FrequencyPenalty,
        seed=req.Seed,
        logit_bias=tuple(sorted(bias.items())),
        grammar=grammar,
    )


def _crash_failpoint(state: BackendState) -> None:
    """At the first decode of this process: the tests' native-crash failpoint (localp2p.cpumode)."""
    first, state.decoded = not state.decoded, True
    if first:
        cpumode.crash_failpoint(state.cpu_mode)


class LlamaBackend(pb_grpc.BackendServicer):
    """gRPC servicer; every method owns its error mapping to a gRPC status."""

    def __init__(self, cpu_mode: cpumode.CpuMode = cpumode.CpuMode.DEFAULT, extra_bufts: bool = True) -> None:
        self.state = BackendState(cpu_mode=cpu_mode, extra_buffer_types=extra_bufts)
        self.state.load_log.install()
        #: Every llama.cpp computation runs here (see engine_thread: one OpenMP team).
        self.engine = EngineThread()

    # -- lifecycle ---------------------------------------------------------------------

    def Health(self, request: pb.HealthMessage, context: grpc.ServicerContext) -> pb.Reply:
        return pb.Reply(message=b"OK")

    def LoadModel(self, request: pb.ModelOptions, context: grpc.ServicerContext) -> pb.Result:
        bound = log.bind(request_id=request.RequestId or None, model=request.Model)
        try:
            check_gguf(pathlib.Path(request.ModelFile))
            servers = tuple(request.RPCServers) or parse_rpc_servers(os.environ.get(RPC_SERVERS_ENV))
        except ConfigError as exc:
            return pb.Result(success=False, message=str(exc))
        # The model file's size stands for the weight bytes a load places (locally and on the
        # workers): llama.cpp reports progress over all tensors, not per device, and the GGUF
        # header is a few MB of it. (Summing tensor sizes with GGUFReader is exact but takes
        # seconds for a 50k-token vocabulary.) Set early, so Status has it while probing.
        self.state.load_bytes_total = pathlib.Path(request.ModelFile).stat().st_size
        return self.engine.call(self._load_model, request, servers, bound)

    def _load_model(self, request: pb.ModelOptions, servers: tuple[str, ...], bound: Any) -> pb.Result:
        """LoadModel's work, on the engine thread: register the rpc-servers once, load the model."""
        with self.state.lock:
            if self.state.registered is not None and servers != self.state.registered:
                return pb.Result(
                    success=False,
                    message="this backend process is bound to other rpc-servers; restart it to change them",
                )
            if self.state.registered is None:
                self.state.devices = self._register(servers, bound)
                self.state.registered = servers
            self._unload()  # drop the old model before loading the next
            try:
                self.state.model = self._load(request, bound)
                self.engine.stepper = self.state.model.scheduler
            except Exception as exc:  # llama-cpp-python raises bare ValueError/RuntimeError
                self.state.error = f"failed to load {request.Model}: {exc}"
                bound.error("model load failed", error=str(exc))
                return pb.Result(success=False, message=self.state.error)
            self.state.error = ""
        return pb.Result(success=True, message="loaded")

    def _register(self, servers: tuple[str, ...], bound: Any) -> list[DeviceState]:
        """Probe every rpc-server and register the good ones; skip the rest with a warning."""
        devices = []
        for endpoint in servers:
            device = DeviceState(endpoint=endpoint)
            try:
                info = rpc.probe(endpoint)
                rpc.register_server(endpoint)
            except rpc.RPCError as exc:
                device.skipped_reason = str(exc)
                bound.warning("skipping rpc-server", endpoint=endpoint, reason=str(exc))
            else:
                device.memory_free, device.memory_total = info.memory_free, info.memory_total
                device.used = True
                bound.info(
                    "rpc-server registered",
                    endpoint=endpoint,
                    protocol=info.version_text,
                    free_mib=info.memory_free >> 20,
                )
            devices.append(device)
        return devices

    def _load(self, request: pb.ModelOptions, bound: Any) -> LoadedModel:
        import llama_cpp  # noqa: PLC0415 - heavy; the module imports fast for --help

        model_file = pathlib.Path(request.ModelFile)
        used = [d for d in self.state.devices if d.used]
        n_gpu_layers = (request.NGPULayers if request.NGPULayers > 0 else -1) if used else 0
        split = list(request.TensorSplit)
        if split and len(split) != len(used):
            bound.warning("tensor_split ignored: it names a different number of devices", split=split, devices=len(used))
            split = []
        keep_output = bool(used) and not request.OffloadOutput
        parallel = max(1, request.Parallel)
        context_size = request.ContextSize or 2048
        started = time.monotonic()
        self.state.load_log.begin_load()
        with (
            output_layer_on_host(keep_output),
            self._load_progress(),
            extra_buffer_types(self.state.extra_buffer_types),
            parallel_sequences(parallel),
        ):
            llm = llama_cpp.Llama(
                model_path=str(model_file),
                n_ctx=context_size * parallel,  # each sequence gets the whole window
                n_threads=request.Threads or None,
                n_gpu_layers=n_gpu_layers,
                tensor_split=split or None,
                n_batch=max(request.Batch or 512, PROMPT_CHUNK, parallel),
                n_ubatch=max(request.Batch or 512, PROMPT_CHUNK, parallel),
                use_mmap=request.MMap,
                use_mlock=request.MLock,
                seed=request.Seed or llama_cpp.LLAMA_DEFAULT_SEED,
                chat_format=request.ChatTemplate or None,
                op_offload=False,  # never ship host-resident weights to a worker per batch
                verbose=False,
            )
        # The layer count comes from the loaded model: reading it before the load with
        # gguf's GGUFReader maps every tensor and the whole vocabulary (seconds per load,
        # on every reload and every failover).
        n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        for device, layers in zip(used, assign_layers(n_layer, split or [float(d.memory_free) for d in used], n_gpu_layers), strict=True):
            device.layers = layers
        on_workers = sum(d.layers for d in used)
        scheduler = Scheduler(llm, parallel)
        n_ctx = scheduler.n_ctx_seq
        if n_ctx != context_size:  # llama.cpp rounds the context up (to a multiple of 256)
            bound.warning("context size adjusted by llama.cpp", context_size=context_size, effective=n_ctx)
        try:
            chat, chat_error = ChatPrompt(llm), ""
        except (ValueError, KeyError) as exc:
            chat, chat_error = None, str(exc)
            bound.warning("chat requests will be refused", reason=chat_error)
        bound.info(
            "model loaded",
            context_size=n_ctx,
            parallel=parallel,
            seconds=round(time.monotonic() - started, 2),
            layers=n_layer,
            on_workers=on_workers,
            output_local=not used or keep_output,
            workers=[f"{d.endpoint}={d.layers}" for d in used],
            cpu_mode=self.state.cpu_mode.value,
            weight_buffers_mib=self.state.load_log.weight_buffers,
        )
        return LoadedModel(
            name=request.Model,
            options=request,
            llm=llm,
            layers_total=n_layer,
            layers_local=n_layer - on_workers,
            scheduler=scheduler,
            chat=chat,
            chat_error=chat_error,
        )

    def _unload(self) -> None:
        """Drop the loaded model (on the engine thread): its jobs end with an error."""
        model, self.state.model = self.state.model, None
        self.engine.stepper = None
        if model is not None:
            model.scheduler.close()

    @contextlib.contextmanager
    def _load_progress(self) -> Iterator[None]:
        """While active, llama.cpp's load progress goes into ``state.load_fraction`` (read by Status)."""

        def note(fraction: float) -> None:
            self.state.load_fraction = fraction

        self.state.loading, self.state.load_fraction = True, 0.0
        try:
            with progress_callback(note):
                yield
        finally:
            self.state.loading = False

    def Free(self, request: pb.HealthMessage, context: grpc.ServicerContext) -> pb.Result:
        def free() -> None:
            with self.state.lock:
                self._unload()

        self.engine.call(free)
        return pb.Result(success=True, message="freed")

    def Status(self, request: pb.HealthMessage, context: grpc.ServicerContext) -> pb.StatusResponse:
        model = self.state.model
        if self.state.error:
            state = pb.StatusResponse.ERROR
        elif model is None:
            state = pb.StatusResponse.UNINITIALIZED
        else:
            state = pb.StatusResponse.BUSY if model.scheduler.running else pb.StatusResponse.READY
        return pb.StatusResponse(
            state=state,
            model=model.name if model else "",
            devices=[
                pb.RPCDevice(
                    endpoint=d.endpoint,
                    memory_free=d.memory_free,
                    memory_total=d.memory_total,
                    layers=d.layers,
                    used=d.used,
                    skipped_reason=d.skipped_reason,
                )
                for d in self.state.devices
            ],
            layers_total=model.layers_total if model else 0,
            layers_local=model.layers_local if model else 0,
            memory_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            loading=self.state.loading,
            load_fraction=self.state.load_fraction,
            load_bytes_total=self.state.load_bytes_total,
            cpu_mode=self.state.cpu_mode.value,
            weight_buffers=self.state.load_log.weight_buffers,
        )

    # -- inference ---------------------------------------------------------------------

    def _model(self, context: grpc.ServicerContext) -> LoadedModel:
        model = self.state.model
        if model is None:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, self.state.error or "no model loaded")
        return model  # type: ignore[return-value]

    def _job(self, model: LoadedModel, request: pb.PredictOptions) -> Job:
        """The scheduler's job for ``request`` (prompt tokens, sampler, output); raises
        RequestError for what cannot be served as asked."""
        llm = model.llm
        continued = list(request.ContinueTokens)
        if any(not 0 <= token < llm.n_vocab() for token in continued):
            raise RequestError("ContinueTokens holds ids outside the vocabulary")
        if any(not 0 <= token < llm.n_vocab() for token in request.LogitBias):
            raise RequestError(f"logit_bias names a token id outside the vocabulary (0..{llm.n_vocab() - 1})")
        try:
            plan = structured.plan(request.ResponseFormat, request.Tools, request.ToolChoice, request.ParallelToolCalls)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        stop = list(request.StopPrompts)
        if request.Messages:
            if model.chat is None:
                raise RequestError(f"model {model.name} cannot serve chat: {model.chat_error}")
            messages = [
                {
                    "role": m.role,
                    "content": m.content,
                    **({"name": m.name} if m.name else {}),
                    **({"tool_calls": m.tool_calls} if m.tool_calls else {}),
                    **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {}),
                }
                for m in request.Messages
            ]
            try:
                rendered = model.chat.tokens(structured.chat_messages(messages, plan))
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            prompt, stop = rendered.tokens, stop + list(rendered.stop)
        else:
            if plan.calls_tools:
                raise RequestError("tools need chat messages")
            prompt = list(llm.tokenize(request.Prompt.encode("utf-8"), add_bos=True, special=True))
        limit = model.scheduler.n_ctx_seq
        if len(prompt) + len(continued) >= limit:
            raise RequestError(f"Requested tokens ({len(prompt) + len(continued)}) exceed context window of {limit}")
        try:
            bans = model.end_tokens() if request.IgnoreEOS else []
            sampler = Sampler(model.scheduler.vocab, llm.n_vocab(), _sampling_params(request, plan.grammar, bans))
        except GrammarError as exc:
            raise RequestError(str(exc)) from None
        for token in continued:  # penalties and grammar state as in the first run
            sampler.accept(token)
        return Job(
            prompt=prompt,
            continued=continued,
            sampler=sampler,
            output=TextOutput(stop),
            ends=frozenset(model.end_tokens()),
            max_tokens=max(0, request.Tokens),
            logprobs=request.Logprobs,
            top_logprobs=max(0, request.TopLogprobs),
            tools=structured.ToolCallOutput(plan.tools_required) if plan.calls_tools else None,
            echo=request.Prompt if request.Echo and not request.Messages else "",
            request_id=request.RequestId,
        )

    def _submit(self, model: LoadedModel, job: Job) -> None:
        """On the engine thread: queue ``job`` on ``model``, unless another model was loaded since."""
        if self.state.model is not model:
            raise RequestError("the model was replaced while the request was prepared; retry")
        _crash_failpoint(self.state)
        model.scheduler.submit(job)

    def _generate(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> Generator[pb.Reply, None, None]:
        """One generation's replies (text chunks, then the final one), as the engine makes them.

        The job is cancelled when the client goes away (the call ends) or stops reading.
        A request that cannot be served as asked is INVALID_ARGUMENT.
        """
        model = self._model(context)
        try:
            job = self._job(model, request)
        except RequestError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if job.continued:
            log.info("continuing a generation", continued_tokens=len(job.continued))
        context.add_callback(job.cancelled.set)
        try:
            self.engine.call(self._submit, model, job, exclusive=False)
        except RequestError as exc:
            job.sampler.close()
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        try:
            while True:
                try:
                    kind, value = job.replies.get(timeout=REPLY_POLL)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if kind == END:
                    return
                if kind == ERROR:
                    code = grpc.StatusCode.FAILED_PRECONDITION if isinstance(value, ModelUnloaded) else grpc.StatusCode.INTERNAL
                    _abort(context, code, f"generation failed: {value}")
                yield value
        finally:
            job.cancelled.set()

    def PredictStream(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> Iterator[pb.Reply]:
        scope = _request_scope(request.RequestId)
        scope.run(log.info, "predict start", stream=True, max_tokens=request.Tokens or None)
        yield from _iterate_in(scope, self._generate(request, context))

    def Predict(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.Reply:
        scope = _request_scope(request.RequestId)
        scope.run(log.info, "predict start", stream=False, max_tokens=request.Tokens or None)
        return scope.run(self._predict, request, context)

    def _predict(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.Reply:
        parts: list[bytes] = []
        logprobs: list[pb.TokenLogprob] = []
        ids: list[int] = []
        final = pb.Reply()
        for reply in self._generate(request, context):
            ids.extend(reply.token_ids)
            logprobs.extend(reply.logprobs)
            if reply.finish_reason:
                final = reply
            else:
                parts.append(reply.message)
        final.message = b"".join(parts)
        del final.token_ids[:]
        final.token_ids.extend(ids)
        del final.logprobs[:]
        final.logprobs.extend(logprobs)
        return final

    def TokenizeString(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.TokenizationResponse:
        model = self._model(context)
        tokens = model.llm.tokenize(request.Prompt.encode("utf-8"), add_bos=True, special=False)
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    def Embedding(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.EmbeddingResult:
        return _request_scope(request.RequestId).run(self.engine.call, self._embedding, request, context, exclusive=False)

    def _embedding(self, request: pb.PredictOptions, context: grpc.ServicerContext) -> pb.EmbeddingResult:
        import llama_cpp  # noqa: PLC0415

        inputs = list(request.Inputs) or [request.Prompt]
        with self.state.lock:
            model = self._model(context)
            if not model.options.Embeddings:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"model {model.name} does not serve embeddings")
            if model.embedder is None:
                model.embedder = llama_cpp.Llama(
                    model_path=model.options.ModelFile,
                    n_ctx=model.options.ContextSize or 2048,
                    n_threads=model.options.Threads or None,
                    n_gpu_layers=EMBEDDING_GPU_LAYERS,
                    embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,  # one vector per input, not per token
                    op_offload=False,
                    verbose=False,
                )
            embedder = model.embedder
            prompt_tokens = 0
            data = []
            for text in inputs:
                n = len(embedder.tokenize(text.encode("utf-8"), add_bos=True))
                if n > embedder.n_ctx():
                    _abort(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"input of {n} tokens exceeds the context window of {embedder.n_ctx()}",
                    )
                prompt_tokens += n
                vector = embedder.embed(text, normalize=True)
                data.append(pb.Embedding(embeddings=vector))
        log.info("embedding done", inputs=len(inputs), prompt_tokens=prompt_tokens)
        return pb.EmbeddingResult(data=data, prompt_tokens=prompt_tokens)


