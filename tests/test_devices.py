"""ggml devices (issue 20): listed from this llama.cpp build, chosen as llama.cpp's rpc-server
chooses them, shown in the worker's ready line, and `--device` refused when the build lacks it."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from localp2p.llama import devices
from localp2p.llama.devices import Device, DeviceError
from localp2p.testing.cluster import LOCALP2P, Proc, free_port, start_worker, stopped_on_error

CPU = Device("CPU", "some CPU", "CPU", 8 << 30, 16 << 30)
GPU0 = Device("Vulkan0", "a GPU", "GPU", 3 << 30, 4 << 30)
IGPU1 = Device("Vulkan1", "an iGPU", "IGPU", 1 << 30, 2 << 30)
BLAS = Device("BLAS", "OpenBLAS", "ACCEL", 0, 0)


def test_this_build_lists_its_cpu_device_with_memory() -> None:
    listed = devices.list_devices()
    cpu = [d for d in listed if d.kind == "CPU"]
    assert len(cpu) == 1 and cpu[0].name == "CPU", listed
    assert cpu[0].memory_total > 0 and 0 < cpu[0].memory_free <= cpu[0].memory_total
    assert {"CPU", "RPC"} <= set(devices.backends())
    if not devices.GPU_BACKENDS.intersection(devices.backends()):
        assert devices.select(listed) == cpu


def test_selection_follows_llama_cpp_rpc_server() -> None:
    assert devices.select([CPU, BLAS]) == [CPU]
    assert devices.select([CPU, GPU0, IGPU1, BLAS]) == [GPU0, IGPU1]  # every GPU, no CPU
    assert devices.select([CPU, GPU0, IGPU1], ["Vulkan1"]) == [IGPU1]
    assert devices.select([CPU, GPU0], ["CPU", "Vulkan0"]) == [CPU, GPU0]
    with pytest.raises(DeviceError, match=r"unknown device CUDA0: this llama.cpp build has CPU, Vulkan0"):
        devices.select([CPU, GPU0], ["CUDA0"])


def test_announced_devices_are_checked_and_bounded() -> None:
    announced = [GPU0.as_dict(), "junk", {"name": "x" * 500, "memory_total": "lots"}, {"name": "CPU", "memory_free": -5}]
    assert devices.announced_devices(announced) == [
        GPU0.as_dict(),
        {"name": "CPU", "description": "", "kind": "", "memory_free": 0, "memory_total": 0},
    ]
    assert devices.announced_devices({"not": "a list"}) == []
    assert len(devices.announced_devices([CPU.as_dict()] * 100)) == devices.MAX_DEVICES


def test_worker_ready_line_lists_the_devices_it_serves(tmp_path: pathlib.Path) -> None:
    worker, _ = start_worker(tmp_path)
    try:
        served = devices.select(devices.list_devices())
        expected = ",".join(f"{d.name}({d.kind},{d.memory_total >> 20}MiB)" for d in served)
        assert f" devices={expected}" in worker.ready_line, worker.ready_line
    finally:
        assert worker.stop() == 0


def test_worker_with_an_unknown_device_fails_in_one_line(tmp_path: pathlib.Path) -> None:
    port = free_port()
    done = subprocess.run(
        [*LOCALP2P, "worker", "llama-cpp-rpc", "127.0.0.1", str(port), "--device", "NoSuchGPU0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr
    assert "unknown device NoSuchGPU0" in lines[0] and "this llama.cpp build has CPU" in lines[0], lines[0]


def test_worker_warns_when_a_gpu_is_visible_but_not_built_for(tmp_path: pathlib.Path) -> None:
    if devices.GPU_BACKENDS.intersection(devices.backends()):
        pytest.skip("this llama.cpp build has a GPU backend")
    (tmp_path / "kfd").touch()
    port = free_port()
    env = {devices.DEV_ROOT_ENV: str(tmp_path)}
    worker = Proc(["worker", "llama-cpp-rpc", "127.0.0.1", str(port), "--threads", "1"], tmp_path, "gpu-unused", env)
    try:
        with stopped_on_error(worker):
            line = worker.wait_line("localp2p worker ready")
        assert " devices=CPU(CPU," in line, line
        assert "a GPU is visible (AMD (" in worker.stderr() and "built without a GPU backend" in worker.stderr()
    finally:
        assert worker.stop() == 0
