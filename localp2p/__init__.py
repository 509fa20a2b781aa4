"""localp2p: several ordinary machines, one OpenAI-compatible LLM server."""

__version__ = "0.1.0"
