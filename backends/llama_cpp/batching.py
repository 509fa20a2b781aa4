"""Continuous batching with a prompt cache that never changes an answer.

The model's context holds ``parallel`` sequences, each in its own KV-cache stream
(``kv_unified=false``) with the whole per-sequence context window: a *slot*. A request
takes a free slot (waiting FIFO while none is free) and leaves it when it ends; the
slot keeps its KV cache for the next request.

Each :meth:`Scheduler.step` is at most two llama.cpp decodes: one batch with the next
token of every generating sequence (the network round trips of a step over RPC workers
are paid once for all of them), then one *prompt chunk* of one sequence, alone.

The prompt cache, and why it cannot change the answer: prompts are evaluated in chunks
of :data:`PROMPT_CHUNK` tokens aligned to absolute positions (0..127, 128..255, ...),
each chunk in a decode of its own, into a stream that holds that one sequence at cells
equal to its positions. So the KV values of a whole prompt chunk depend only on the
tokens up to its end: a cold evaluation computes exactly what a warm one reuses. A new
request reuses the longest run of *whole prompt chunks* its slot holds that matches its
own tokens; the last partial chunk and every generated token (evaluated one by one, in
decode batches) are computed again. The temperature-0 answer is therefore
byte-identical whether the cache was cold, warm from a shared prefix, or warm from an
unrelated request (tests/test_prompt_cache.py).

What batching does change: a generating sequence's token is computed in a batch with the
other sequences' tokens, and llama.cpp's matrix kernels may round differently for
different batch sizes. With ``--parallel 1`` every answer is byte-identical to a lone
run; with more, a greedy answer can differ by what else was running (measured in
``make bench``; README "Serving engine").

Everything here runs on the engine thread (engine_thread.EngineThread); a request's
gRPC thread only reads its :class:`Job`'s replies and sets ``cancelled``.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from localp2p._proto import backend_pb2 as pb

from .continuation import TokenLog
from .sampling import Sampler, logprobs_at, token_piece
from .structured import ToolCallOutput
from .text_out import TextOutput

log = structlog.get_logger("backend")

#: Tokens per prompt chunk, aligned to multiples of it. Smaller reuses more of a grown
#: chat history (the last partial chunk is always recomputed); larger evaluates a cold
#: prompt faster. Measured in `make bench` (multi-turn and cold-prompt rows).
PROMPT_CHUNK = 128

#: What a Job's reply queue carries: a reply, an error to raise in the gRPC thread, or the end.
REPLY, ERROR, END = "reply", "error", "end"


class RequestError(ValueError):
    """The request cannot be served as asked (INVALID_ARGUMENT)."""


class ModelUnloaded(RuntimeError):
    """The model was unloaded (a load of another one) before the job ended: retry it."""


@dataclass
class Job:
    """One generation request as the scheduler runs it; created on the request's thread."""

    prompt: list[int]
    continued: list[int]
    sampler: Sampler
    output: TextOutput
    ends: frozenset[int]
    max_tokens: int = 0  # 0: until the context is full
    logprobs: bool = False
    top_logprobs: int = 0
    tools: ToolCallOutput | None = None
    echo: str = ""
    request_id: str = ""
    replies: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Progress, written by the engine thread.
    ids: TokenLog = field(init=False)
    n_past: int = 0  # positions of this sequence in its slot's KV cache
    pending: int | None = None  # the token the next decode step evaluates
    replayed: int = 0  # continued tokens taken so far
    reused: int = 0  # prompt tokens taken from the cache
    submitted: float = field(default_factory=time.monotonic)
    first_at: float | None = None
    finished: bool = False
    _logprobs: list[pb.TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = TokenLog(is_end=self.ends.__contains__, reported=len(self.continued))
        self.ids.prompt = len(self.prompt)

    def send(self, text: str, final: pb.Reply | None = None) -> None:
        """Hand the client ``text`` (if any) with the ids and log-probabilities since the last reply."""
        if not text and final is None:
            return
        reply = final if final is not None else pb.Reply(message=text.encode("utf-8"))
        reply.tokens = self.ids.completion
        reply.token_ids.extend(self.ids.take())
        reply.logprobs.extend(self._logprobs)
        self._logprobs.clear()
        self.replies.put((REPLY, reply))


@dataclass
class Slot:
    """One sequence of the context: its KV-cache stream and what is in it."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens at positions 0.. of this stream
    reusable: int = 0  # leading cached tokens computed as whole prompt chunks
    job: Job | None = None
    released: float = 0.0  # when its last job ended (the least recently used is reused first)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    """Owns the slots of one loaded model and steps their generations.

    ``llm`` is the ``llama_cpp.Llama`` whose context was made with ``parallel`` sequences
    (model.py). Every method runs on the engine thread. A decode that fails ends the
    jobs in it with an error; llama.cpp aborting the process (a worker died) is the
    supervisor's to handle.
    """

    def __init__(self, llm: Any, parallel: int) -> None:
        import llama_cpp  # noqa: PLC0415

        self._lib = llama_cpp
        self._ctx = llm._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.vocab = llm._model.vocab
        self.n_vocab = int(llm.n_vocab())
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self.slots = [Slot(seq) for seq in range(parallel)]
        self._waiting: collections.deque[Job] = collections.deque()
        self._prefill_order: collections.deque[Slot] = collections.deque()
        self._batch = llama_cpp.llama_batch_init(max(PROMPT_CHUNK, parallel), 0, 1)
        #: While true, waiting jobs are not started (a model load waits for the running ones).
        self.hold = False
        self._pieces: dict[int, bytes] = {}

    def abort(self, error: Exception) -> None:
        """End every job with ``error`` and forget every slot's cache."""
        for job in self._waiting:
            self._fail(job, error)
        self._waiting.clear()
        for slot in self.slots:
            if slot.job is not None:
                self._fail(slot.job, error)
            self._release(slot, forget=True)

    def close(self) -> None:
        """End every job (with an error) and free the batch; the scheduler is unusable after."""
        self.abort(ModelUnloaded("the model was unloaded while the request waited; retry"))
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None

    # -- the engine thread's interface -----------------------------------------------------

    def submit(self, job: Job) -> None:
        self._waiting.append(job)

    def has_work(self) -> bool:
        """Jobs to step: running ones, or waiting ones that may start (not on hold)."""
        return self.running > 0 or (bool(self._waiting) and not self.hold)

    @property
    def running(self) -> int:
        return sum(1 for s in self.slots if s.job)

    def step(self) -> None:
        """One round: drop cancelled jobs, start waiting ones, one decode step for all
        generating sequences, one prompt chunk for the oldest sequence still reading."""
        self._reap()
        if not self.hold:
            self._admit()
        decoding = [s for s in self.slots if s.job and s.job.pending is not None]
        if decoding:
            self._decode(decoding)
        while self._prefill_order and (self._prefill_order[0].job is None or self._prefill_order[0].job.pending is not None):
            self._prefill_order.popleft()
        if self._prefill_order:
            self._prefill(self._prefill_order[0])

    # -- admission and the prompt cache ----------------------------------------------------

    def _reap(self) -> None:
        for slot in self.slots:
            job = slot.job
            if job is not None and job.cancelled.is_set():
                log.info("client went away; generation stopped", request_id=job.request_id or None, tokens=job.ids.completion)
                self._release(slot)
        if any(j.cancelled.is_set() for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled.is_set()]:
                log.info("client went away before its turn; generation skipped", request_id=job.request_id or None)
                job.sampler.close()
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled.is_set())

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Leading prompt tokens ``slot`` can serve from its cache: whole prompt chunks only,
        and never the whole prompt (its last token must be evaluated for the first logits)."""
        common = _common_prefix(slot.cached[: slot.reusable], prompt)
        reuse = common // PROMPT_CHUNK * PROMPT_CHUNK
        if reuse >= len(prompt):
            reuse = (len(prompt) - 1) // PROMPT_CHUNK * PROMPT_CHUNK
        return reuse

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            slot = max(free, key=lambda s: (self._reusable(s, job.prompt), -s.released))
            reuse = self._reusable(slot, job.prompt)
            if not self._lib.llama_memory_seq_rm(self._memory, slot.seq, reuse, -1):
                # A model whose memory cannot drop a tail (recurrent): start from nothing.
                self._lib.llama_memory_seq_rm(self._memory, slot.seq, 0, -1)
                reuse = 0
            del slot.cached[reuse:]
            slot.reusable = min(slot.reusable, reuse)
            job.n_past = job.reused = reuse
            slot.job = job
            self._prefill_order.append(slot)
            if job.echo:
                job.send(job.echo)

    # -- decoding --------------------------------------------------------------------------

    def _fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """Put (token, position, sequence, wants logits) rows into the batch."""
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)

    def _run_batch(self, rows: list[tuple[int, int, int, bool]], jobs: list[Job]) -> bool:
        self._fill(rows)
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            error = RuntimeError(f"llama_decode failed ({rc})")
            for slot in self.slots:
                if slot.job in jobs:
                    self._fail(slot.job, error)
                    self._release(slot, forget=True)
            return False
        return True

    def _prefill(self, slot: Slot) -> None:
        """Evaluate the next chunk of ``slot``'s prompt, alone in its batch."""
        job = slot.job
        assert job is not None
        start = job.n_past
        end = min(len(job.prompt), (start // PROMPT_CHUNK + 1) * PROMPT_CHUNK)
        last = end == len(job.prompt)
        rows = [(job.prompt[p], p, slot.seq, last and p == end - 1) for p in range(start, end)]
        if not self._run_batch(rows, [job]):
            return
        job.n_past = end
        slot.cached[start:] = job.prompt[start:end]
        slot.reusable = end // PROMPT_CHUNK * PROMPT_CHUNK
        if last:
            self._next_token(slot, len(rows) - 1)

    def _decode(self, slots: list[Slot]) -> None:
        """One decode step: the pending token of every generating sequence, in one batch."""
        jobs = [s.job for s in slots if s.job]
        rows = [(s.job.pending, s.job.n_past, s.seq, True) for s in slots if s.job and s.job.pending is not None]
        if not self._run_batch(rows, jobs):
            return
        for index, slot in enumerate(slots):
            job = slot.job
            assert job is not None and job.pending is not None
            slot.cached.append(job.pending)
            job.n_past += 1
            job.pending = None
            self._next_token(slot, index)

    def _next_token(self, slot: Slot, index: int) -> None:
        """After a decode: the job's next token (replayed or sampled from batch row ``index``)."""
        job = slot.job
        assert job is not None
        if job.replayed < len(job.continued):
            token = job.continued[job.replayed]
            job.replayed += 1
            replay = True
        else:
            token = job.sampler.sample(self._ctx, index)
            replay = False
            if job.first_at is None:
                job.first_at = time.monotonic()
            if job.logprobs and token not in job.ends:  # OpenAI lists none for the end of generation
                chosen, top = logprobs_at(self._ctx, index, self.n_vocab, token, job.top_logprobs)
                job._logprobs.append(
                    pb.TokenLogprob(
                        id=token,
                        token=self._piece(token),
                        logprob=chosen,
                        top=[pb.TopLogprob(token=self._piece(t), logprob=lp) for t, lp in top],
                    )
                )
        self._take(slot, token, replay)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = token_piece(self.vocab, token)
        return piece

    def _take(self, slot: Slot, token: int, replay: bool) -> None:
        """Account for one generated (or replayed) token: text out, or the end of the job."""
        job = slot.job
        assert job is not None
        job.ids.add(token)
        if token in job.ends:
            self._finish(slot, "stop")
            return
        text = job.output.add(self._piece(token))
        if job.tools is not None:
            text = job.tools.add(text)
        if job.output.stopped:
            job.send(text)
            self._finish(slot, "stop")
            return
        job.send(text)
        if (job.max_tokens and job.ids.completion >= job.max_tokens) or job.n_past + 1 >= self.n_ctx_seq:
            self._finish(slot, "length")
            return
        job.pending = token

    # -- the end of a job ------------------------------------------------------------------

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        text = job.output.flush()
        tool_calls = ""
        if job.tools is not None:
            text = job.tools.add(text)
            calls = job.tools.calls()
            if calls is not None:
                tool_calls, reason = json.dumps(calls, ensure_ascii=False), "tool_calls"
            elif job.tools.is_call:
                text = job.tools.held()  # not a complete call (cut by max_tokens): as text
        job.send(text)
        done = time.monotonic()
        first_at = job.first_at or done
        tokens = job.ids.completion
        log.info(
            "generation done",
            request_id=job.request_id or None,
            tokens=tokens,
            prompt_tokens=job.ids.prompt,
            cached_tokens=job.reused,
            ttft_ms=round((first_at - job.submitted) * 1000, 1),
            tokens_per_s=round(tokens / (done - first_at), 1) if done > first_at else None,
            finish=reason,
        )
        job.send(
            "",
            pb.Reply(
                prompt_tokens=job.ids.prompt,
                cached_tokens=job.reused,
                finish_reason=reason,
                tool_calls=tool_calls,
                timing_prompt_processing=first_at - job.submitted,
                timing_token_generation=done - first_at,
            ),
        )
        job.replies.put((END, None))
        self._release(slot)

    def _fail(self, job: Job, error: Exception) -> None:
        if not job.finished:
            job.finished = True
            job.replies.put((ERROR, error))
        job.sampler.close()

    def _release(self, slot: Slot, forget: bool = False) -> None:
        """Free ``slot`` for the next job (its cache stays unless ``forget``)."""
        job = slot.job
        if job is not None:
            job.finished = True
            job.sampler.close()
        slot.job = None
        slot.released = time.monotonic()
        if forget:
            self._lib.llama_memory_seq_rm(self._memory, slot.seq, 0, -1)
            slot.cached, slot.reusable = [], 0
