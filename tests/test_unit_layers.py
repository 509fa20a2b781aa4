"""Unit tests (no processes): where a model's repeating layers go (localp2p.llama.layers.assign_layers).

The expected counts are worked out by hand from llama.cpp's rule: layer ``il`` goes to the
first device whose cumulative split point exceeds ``(il - gpu_start) / act_layers``, the
output layer taking part in the split as one more layer.
"""

from __future__ import annotations

import pytest

from localp2p.llama.layers import assign_layers


@pytest.mark.parametrize(
    ("n_layer", "weights", "n_gpu_layers", "expected"),
    [
        (30, [], -1, []),  # no device: nothing to say
        (30, [1.0], -1, [30]),  # one device takes every repeating layer
        (30, [1.0, 1.0], -1, [16, 14]),  # 31 shares (the output layer's is the last): 0..15 < 0.5
        (30, [4e9, 4e9], -1, [16, 14]),  # free memory in bytes: only the ratio counts
        (8, [3.0, 1.0], -1, [7, 1]),  # il / 9 < 0.75 for il <= 6
        (10, [1.0, 0.0, 1.0], -1, [6, 0, 4]),  # a device with no share gets no layer
        (10, [0.0, 0.0], -1, [6, 4]),  # all-zero weights count as equal shares
        (30, [1.0, 2.0, 3.0], -1, [6, 10, 14]),  # split points 1/6, 1/2, 1: il <= 5, <= 15, the rest
        (30, [1.0, 1.0], 0, [0, 0]),  # nothing offloaded
        (30, [1.0, 1.0], 10, [5, 4]),  # the last 10 (9 repeating + output) split: il 21..25, 26..29
        (30, [1.0], 31, [30]),  # all layers and the output
        (30, [1.0], 100, [30]),  # more than there are
    ],
)
def test_assign_layers(n_layer: int, weights: list[float], n_gpu_layers: int, expected: list[int]) -> None:
    assert assign_layers(n_layer, weights, n_gpu_layers) == expected


@pytest.mark.parametrize("n_layer", [1, 2, 7, 30, 64])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0], [5.0, 1.0, 2.0], [0.1, 10.0], [1.0, 0.0, 3.0, 1.0]])
@pytest.mark.parametrize("n_gpu_layers", [-1, 0, 1, 5, 31, 65])
def test_counts_add_up_to_the_offloaded_repeating_layers(n_layer: int, weights: list[float], n_gpu_layers: int) -> None:
    counts = assign_layers(n_layer, weights, n_gpu_layers)
    offloaded = n_layer if n_gpu_layers < 0 else max(0, min(n_gpu_layers, n_layer + 1) - 1)
    assert len(counts) == len(weights)
    assert sum(counts) == offloaded
    assert all(c >= 0 for c in counts)


def test_a_bigger_share_never_gets_fewer_layers() -> None:
    previous = -1
    for share in (0.0, 0.1, 0.5, 1.0, 1.5, 2.0, 4.0, 10.0, 100.0):
        _, second = assign_layers(30, [1.0, share])
        assert second >= previous
        previous = second
    assert previous == 29  # the first device keeps its boundary layer (il 0 < any positive split point)
