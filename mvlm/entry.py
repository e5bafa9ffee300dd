"""The ``mvlm`` console script and ``python -m mvlm``: the stop signals (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) are
taken first thing and held while the command starts up, so one that arrives then is said in one line with its exit
code (128 + the signal) once the command runs, never a traceback or a silent death."""

from __future__ import annotations


def main() -> None:
    from mvlm_core.stops import StopSignals

    stops = StopSignals().install()
    stops.pause()
    from mvlm.cli import main as cli_main

    cli_main(stops)
