"""mvlm_bench: pinned llama.cpp runtimes, device transports, benchmark protocols, timing parser and reports."""

__version__ = "0.1.0"
