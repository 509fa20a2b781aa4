"""Every llama.cpp computation of the backend runs on one thread (backends/llama_cpp/engine_thread).

llama.cpp keeps an OpenMP team per calling thread; requests served from several gRPC
pool threads would spread the work over one team each (and decode ~2.6× slower on 2
cores). Measured from outside, per thread of the real backend process: after many
concurrent and sequential requests, the CPU time went to at most ``--threads`` threads
(the engine thread and its OpenMP workers), not to one team per gRPC thread.
"""

from __future__ import annotations

import concurrent.futures
import pathlib

from localp2p.testing.cluster import Server, start_server, stream_text

#: llama.cpp threads of the server under test (start_server passes --threads 2).
THREADS = 2
#: A thread that did at least this share of the backend's CPU work counts as computing.
BUSY_SHARE = 0.10


def _thread_cpu(pid: int) -> dict[int, int]:
    """utime + stime (jiffies) of every thread of ``pid``."""
    times = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        times[int(task.name)] = int(fields[11]) + int(fields[12])
    return times


def _chat(server: Server, i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"Count from {i} to {i + 20}."}], "temperature": 0, "max_tokens": 24}
    text, _ = stream_text(server.stream_events("/v1/chat/completions", body))
    return text


def test_llama_cpp_work_stays_on_one_team_of_threads(log_dir: pathlib.Path) -> None:
    server = start_server(log_dir, name="engine-thread")
    try:
        pid = server.status()["backend"]["pid"]
        before = _thread_cpu(pid)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for round_ in range(3):
                concurrent_answers = list(pool.map(lambda i: _chat(server, i), range(round_ * 10, round_ * 10 + 4)))
                assert all(concurrent_answers)
                assert _chat(server, 100 + round_) and _chat(server, 200 + round_)
        after = _thread_cpu(pid)
        spent = {tid: after[tid] - before.get(tid, 0) for tid in after}
        total = sum(spent.values())
        busy = sorted((jiffies for jiffies in spent.values() if jiffies >= BUSY_SHARE * total), reverse=True)
        assert total > 0
        assert len(busy) <= THREADS, f"CPU spread over {len(busy)} threads (jiffies {busy} of {total}): one OpenMP team per caller"
    finally:
        server.close()
