"""localp2p benchmarks: the cost of every layer, measured side by side in one run.

Run ``make bench`` (everything, ~10 min on 2 cores) or ``make bench-quick`` (SmolLM2 only,
fewer repetitions). Results: ``bench/results/latest.{md,json,png}``. See ``bench/run.py``.
"""
