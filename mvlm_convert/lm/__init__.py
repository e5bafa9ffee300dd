"""Language-model GGUF writers: ``base`` (hyper-parameters, the tensor-planning loop, the vocab writers) and one
module per llama.cpp architecture saying only what differs (``llama``, ``phi2``, ``qwen2``, ``phi3``)."""
