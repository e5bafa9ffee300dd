"""mvlm_convert: released VLM checkpoints (MobileVLM and peers) to llama.cpp GGUF, and proof that they compute the same."""

__version__ = "0.1.0"
