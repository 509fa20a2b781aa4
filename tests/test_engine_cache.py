"""Issue 14: the batching engine's prompt cache computes exactly what a cold evaluation does.

In-process, on the real llama.cpp (backends.llama_cpp.batching.Scheduler): the same
prompt's greedy tokens *and their log-probabilities* (bit for bit: any rounding
difference in the reused KV cache would show there first) are compared cold, warm from
a shared prefix, warm from an exact repeat, and after an unrelated prompt; with one slot
and with several busy slots.

The model has F16 weights on purpose: on x86 llama.cpp multiplies a batch of one token
with a different kernel than a larger batch, so a cache that evaluates only the last
prompt token of a repeated prompt (the usual shortcut) changes the log-probabilities
here; aligned whole-chunk reuse does not.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from backends.llama_cpp.batching import END, PROMPT_CHUNK, Job, Scheduler
from backends.llama_cpp.model_params import parallel_sequences
from backends.llama_cpp.sampling import Sampler, SamplingParams
from backends.llama_cpp.text_out import TextOutput
from localp2p.genmodel import Shape, write_model

F16 = Shape(layers=4, embd=512, ff=1024, heads=8, kv_heads=4, tensor_type="f16")
TOKENS = 24
SLOTS = 3

Result = list[tuple[int, float, tuple[float, ...]]]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    import llama_cpp

    path = write_model(tmp_path_factory.mktemp("models") / "f16.gguf", F16)
    with parallel_sequences(SLOTS):
        llm = llama_cpp.Llama(str(path), n_ctx=1024 * SLOTS, n_batch=512, n_ubatch=512, n_threads=2, verbose=False)
    engine = Scheduler(llm, SLOTS)
    yield engine
    engine.close()


def _job(engine: Scheduler, prompt: list[int]) -> Job:
    sampler = Sampler(engine.vocab, engine.n_vocab, SamplingParams(temperature=0))
    return Job(
        prompt=prompt, continued=[], sampler=sampler, output=TextOutput(), ends=frozenset(), max_tokens=TOKENS, logprobs=True, top_logprobs=3
    )


def _result(job: Job) -> Result:
    out: Result = []
    while True:
        kind, reply = job.replies.get(timeout=60)
        if kind == END:
            return out
        out.extend((lp.id, lp.logprob, tuple(t.logprob for t in lp.top)) for lp in reply.logprobs)


def _run(engine: Scheduler, *prompts: list[int]) -> list[Result]:
    """Run ``prompts`` together (one slot each) to the end."""
    jobs = [_job(engine, p) for p in prompts]
    for job in jobs:
        engine.submit(job)
    while engine.has_work():
        engine.step()
    return [_result(job) for job in jobs]


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20000) for _ in range(n)]


def _reused(engine: Scheduler, job_prompt: list[int]) -> int:
    return max(engine._reusable(slot, job_prompt) for slot in engine.slots)


def test_cache_reuse_is_bit_identical(scheduler: Scheduler) -> None:
    shared = _tokens(1, 2 * PROMPT_CHUNK + 40)
    prompt = [*shared, *_tokens(2, 30)]
    sibling = [*shared, *_tokens(3, 30)]
    unrelated = _tokens(4, 300)

    (cold,) = _run(scheduler, prompt)
    assert len(cold) == TOKENS

    # Exact repeat: the cache serves the whole chunks (the engine recomputes the rest).
    reused = _reused(scheduler, prompt)
    assert _run(scheduler, prompt) == [cold]
    assert reused >= 2 * PROMPT_CHUNK

    # Warm from a request that shares the prefix.
    _run(scheduler, sibling)
    reused = _reused(scheduler, prompt)
    assert _run(scheduler, prompt) == [cold]
    assert reused >= 2 * PROMPT_CHUNK

    # After unrelated prompts filled every slot: cold again, same answer.
    _run(scheduler, *[[*unrelated, i] for i in range(SLOTS)])
    assert _reused(scheduler, prompt) == 0
    assert _run(scheduler, prompt) == [cold]


def test_prompt_evaluation_does_not_depend_on_other_slots(scheduler: Scheduler) -> None:
    """A prompt read while other sequences generate gets the same first-token log-probabilities
    (prompt chunks are evaluated alone, into a KV stream of their own)."""
    prompt = _tokens(5, PROMPT_CHUNK + 17)
    (alone,) = _run(scheduler, prompt)
    together = _run(scheduler, _tokens(6, 200), prompt, _tokens(7, 90))
    assert together[1][0] == alone[0]

