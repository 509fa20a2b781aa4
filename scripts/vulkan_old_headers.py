"""Let llama.cpp's Vulkan backend build against Vulkan headers older than 1.3.261 (Debian 12: 1.3.239).

``python scripts/vulkan_old_headers.py SOURCE_DIR`` edits the llama-cpp-python source tree
in place: the one use of VK_EXT_layer_settings (a validation-layer setting, only used when
GGML_VK_VALIDATE is set) is compiled only where the headers declare the extension.
install.sh runs it for LOCALP2P_GPU=vulkan when vulkan_core.h lacks the extension.
"""

from __future__ import annotations

import pathlib
import sys

START = "    VkBool32 enable_best_practice = layer_settings;\n"
END = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);\n"
FALLBACK = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);\n"


def main(source: str) -> int:
    path = pathlib.Path(source) / "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
    text = path.read_text()
    if "#ifdef VK_EXT_layer_settings\n" + START in text:
        return 0  # already patched
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        print(f"vulkan_old_headers: {path} has changed; the patch no longer applies", file=sys.stderr)
        return 1
    end += len(END)
    text = text[:start] + "#ifdef VK_EXT_layer_settings\n" + text[start:end] + "#else\n" + FALLBACK + "#endif\n" + text[end:]
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
