"""mvlm_bench: devices, transports, benchmark protocols, timing parser, records and reports, history and the gate."""

__version__ = "0.1.0"
