"""llama.cpp backend process: ``python -m backends.llama_cpp --addr unix:/path/backend.sock``."""
