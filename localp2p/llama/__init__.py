"""llama.cpp pieces shared by the server and the workers: the ggml-RPC protocol and ctypes
entry points (rpc), layer assignment (layers)."""
