"""scripts/install.sh picks the llama.cpp build for what the machine has (issue 20).

The real script runs with ``--select`` (it prints its choice and stops before touching a
virtual environment) in made-up machines: a PATH of stub programs (nvidia-smi, nvcc, glslc),
a fake /dev (LOCALP2P_DEV_ROOT) and a fake Vulkan SDK (VULKAN_SDK).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

INSTALL = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "install.sh"
#: What the script needs from the system before it selects (and nothing else: no nvcc, no glslc).
TOOLS = ("bash", "dirname", "uname", "grep", "cat", "ldconfig")


class Machine:
    """A made-up machine: only the tools, stubs and files a test adds."""

    def __init__(self, root: pathlib.Path) -> None:
        self.bin = root / "bin"
        self.dev = root / "dev"
        self.cuda = root / "no-cuda"
        self.bin.mkdir()
        self.dev.mkdir()
        for tool in TOOLS:
            found = shutil.which(tool) or shutil.which(tool, path="/sbin:/usr/sbin")
            if found:
                (self.bin / tool).symlink_to(found)
        self.env = {"PATH": str(self.bin), "LOCALP2P_DEV_ROOT": str(self.dev), "CUDA_HOME": str(self.cuda), "HOME": str(root)}
        self.root = root

    def stub(self, name: str, code: int = 0) -> None:
        path = self.bin / name
        path.write_text(f"#!{shutil.which('bash')}\nexit {code}\n")
        path.chmod(0o755)

    def render_node(self) -> None:
        (self.dev / "dri").mkdir(exist_ok=True)
        (self.dev / "dri" / "renderD128").touch()

    def vulkan_sdk(self) -> None:
        sdk = self.root / "vulkan-sdk"
        (sdk / "include" / "vulkan").mkdir(parents=True)
        (sdk / "include" / "vulkan" / "vulkan.h").touch()
        self.env["VULKAN_SDK"] = str(sdk)
        self.stub("glslc")

    def select(self, gpu: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **({"LOCALP2P_GPU": gpu} if gpu is not None else {}))
        return subprocess.run(
            [str(self.bin / "bash"), str(INSTALL), "--select"], env=env, capture_output=True, text=True, timeout=30, check=False
        )

    def choice(self, gpu: str | None = None) -> str:
        done = self.select(gpu)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def refusal(self, gpu: str) -> str:
        """The one stderr line of a refused LOCALP2P_GPU=gpu."""
        done = self.select(gpu)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode != 0 and not done.stdout.strip(), (done.stdout, done.stderr)
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"install: LOCALP2P_GPU={gpu}: "), lines[0]
        return lines[0]


@pytest.fixture
def machine(tmp_path: pathlib.Path) -> Machine:
    if os.uname().sysname != "Linux":
        pytest.skip("the made-up machines are Linux ones")
    return Machine(tmp_path)


def test_nothing_special_is_cpu_with_no_extra_flags(machine: Machine) -> None:
    assert machine.choice() == "gpu=cpu cmake="
    assert machine.choice("cpu") == "gpu=cpu cmake="
    assert machine.choice("auto") == "gpu=cpu cmake="


def test_nvidia_driver_and_nvcc_is_cuda(machine: Machine) -> None:
    machine.stub("nvidia-smi")
    assert machine.choice() == "gpu=cpu cmake="  # a driver alone cannot build CUDA
    machine.stub("nvcc")
    assert machine.choice() == "gpu=cuda cmake=-DGGML_CUDA=ON"
    assert machine.choice("cpu") == "gpu=cpu cmake="  # an explicit choice wins


def test_nvcc_from_cuda_home_counts(machine: Machine) -> None:
    machine.stub("nvidia-smi")
    (machine.cuda / "bin").mkdir(parents=True)
    shutil.copy(machine.bin / "nvidia-smi", machine.cuda / "bin" / "nvcc")
    assert machine.choice() == "gpu=cuda cmake=-DGGML_CUDA=ON"


def test_a_broken_driver_is_no_gpu(machine: Machine) -> None:
    machine.stub("nvidia-smi", code=9)  # installed, but no device answers
    machine.stub("nvcc")
    assert machine.choice() == "gpu=cpu cmake="


def test_a_gpu_and_the_vulkan_toolchain_is_vulkan(machine: Machine) -> None:
    machine.vulkan_sdk()
    assert machine.choice() == "gpu=cpu cmake="  # the toolchain alone: no GPU to run on
    machine.render_node()
    assert machine.choice() == "gpu=vulkan cmake=-DGGML_VULKAN=ON"
    (machine.bin / "glslc").unlink()
    assert machine.choice() == "gpu=cpu cmake="


def test_amd_kfd_with_the_vulkan_toolchain_is_vulkan(machine: Machine) -> None:
    (machine.dev / "kfd").touch()
    machine.vulkan_sdk()
    assert machine.choice() == "gpu=vulkan cmake=-DGGML_VULKAN=ON"
    assert machine.choice("vulkan") == "gpu=vulkan cmake=-DGGML_VULKAN=ON"


def test_a_requested_accelerator_that_cannot_be_built_fails_in_one_line(machine: Machine) -> None:
    line = machine.refusal("cuda")
    assert "no CUDA compiler" in line and "nvcc" in line, line
    line = machine.refusal("vulkan")
    assert "glslc" in line and "apt-get install" in line, line
    assert "Metal needs macOS" in machine.refusal("metal")
    assert "not one of cuda, vulkan, metal, cpu" in machine.refusal("rocm")
    machine.stub("nvcc")
    assert machine.choice("cuda") == "gpu=cuda cmake=-DGGML_CUDA=ON"  # building needs no driver
