"""omniserve: serve, quantize, evaluate and ship multimodal checkpoints behind one OpenAI-compatible API."""

__version__ = "0.1.0"
