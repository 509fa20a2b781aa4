"""Where a model's layers go: the same arithmetic llama.cpp uses, so it can be reported.

llama.cpp (``llama_model::load_tensors``) turns the per-device split (free memory by
default, else ``tensor_split``) into cumulative split points and gives repeating layer
``il`` to the first device whose split point exceeds ``il / (n_layer + 1)`` when every
layer is offloaded. Computing it here lets ``/api/p2p`` and ``status`` say how many
layers each worker holds without asking llama.cpp.
"""

from __future__ import annotations

import bisect


def assign_layers(n_layer: int, weights: list[float], n_gpu_layers: int = -1) -> list[int]:
    """Repeating layers per device, as llama.cpp places them.

    ``weights`` are the devices' shares (free memory or a tensor split), in device
    order; ``n_gpu_layers`` counts offloaded layers from the end, the output layer
    being the last (negative = all). Returns one count per device; layers not counted
    stay on the host. All-zero weights count as equal shares.
    """
    if not weights:
        return []
    if not any(w > 0 for w in weights):
        weights = [1.0] * len(weights)
    if n_gpu_layers < 0:
        n_gpu_layers = n_layer + 1
    total = float(sum(weights))
    points = []
    running = 0.0
    for w in weights:
        running += w
        points.append(running / total)
    gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act_layers = min(n_gpu_layers, n_layer + 1)  # the output layer takes part in the split
    counts = [0] * len(weights)
    for il in range(gpu_start, n_layer):
        device = bisect.bisect_right(points, (il - gpu_start) / act_layers)
        counts[min(device, len(weights) - 1)] += 1
    return counts
