"""The project's llama.cpp patch set (see docs/runtime.md). Files are applied in name order."""
