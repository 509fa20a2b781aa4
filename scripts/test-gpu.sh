#!/usr/bin/env bash
# `make test-gpu`: llama.cpp's Vulkan backend without a GPU, on Mesa's software Vulkan
# driver (lavapipe). Builds llama-cpp-python for Vulkan once (cached beside the CPU wheel,
# installed into its own environment, $VULKAN_VENV, never into the main one), then runs
# tests/test_gpu_vulkan.py: a worker on that build reports the Vulkan device, and a
# temperature-0 answer through it is compared with the CPU answer.
#
#   VENV=.venv                 the main environment (`make install`), which runs the tests
#   VULKAN_VENV=.venv-vulkan   where the Vulkan build goes
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VULKAN_VENV=${VULKAN_VENV:-.venv-vulkan}

say() { printf '==> %s\n' "$*"; }
die() { printf 'test-gpu: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || die "run \`make install\` first"
lvp=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
debs=()
[ -e "$lvp" ] || debs+=(mesa-vulkan-drivers)
[ -e /usr/include/vulkan/vulkan.h ] || debs+=(libvulkan-dev)
command -v glslc >/dev/null || debs+=(glslc)
[ -e /usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake ] || debs+=(spirv-headers)
if [ ${#debs[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "missing Debian packages ${debs[*]} and apt is not usable here"
    say "installing ${debs[*]} (Debian packages)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${debs[@]}"
fi

start=$(date +%s)
main_python=$(cd "$(dirname "$VENV/bin/python")" && pwd)/python
VENV=$VULKAN_VENV LOCALP2P_GPU=vulkan PYTHON=$main_python bash scripts/install.sh --llama-only
say "Vulkan build ready in $(( $(date +%s) - start )) s (the first time it is built, later runs reuse the cached wheel)"

# The worker runs the main environment's Python with the Vulkan llama-cpp-python first on
# its path; lavapipe is a CPU-type Vulkan device, which ggml skips unless it is named.
site=$("$VULKAN_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LOCALP2P_VULKAN_SITE=$site VK_ICD_FILENAMES=$lvp GGML_VK_VISIBLE_DEVICES=0
"$VENV/bin/python" -m pytest -v -s tests/test_gpu_vulkan.py "$@"
