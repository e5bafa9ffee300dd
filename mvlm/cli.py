"""The ``mvlm`` command line: one typer app, sub-commands wired from the two packages."""

from __future__ import annotations

import errno
import os
import re
import sys

import typer

from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError

app = typer.Typer(
    name="mvlm",
    help="Small vision-language models (MobileVLM and peers): checkpoint -> llama.cpp GGUF -> proof -> device latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # llama.cpp's tools (llama-bench -h) take both
)


def _help_type_labels() -> None:
    """typer >= 0.2x labels every option in ``--help`` with its type, flags too: ``--json <bool>`` reads as if it took
    a value, and ``--json true`` then fails. A flag takes none: its label is dropped. A repeatable option shows its
    item type and an ellipsis (``<str>…``), not Python's ``<list[str]>``; other options keep their labels."""
    from typer import core

    option = getattr(core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "mvlm_relabelled", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        return shown(self, ctx)

    display_type_rich.mvlm_relabelled = True
    option.display_type_rich = display_type_rich
    for kind in (option, getattr(core, "TyperArgument", None)):
        typed = getattr(kind, "display_type", None)
        if typed is not None:
            kind.display_type = _items_not_lists(typed)


def _items_not_lists(typed):
    def display_type(self, ctx):
        label = typed(self, ctx)
        return re.sub(r"^<list\[(.+)\]>$", r"<\1>…", label) if isinstance(label, str) else label

    return display_type


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from mvlm_core.runtime import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON_VERSION, project_patches

    try:
        mine = version("mvlm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        mine = "(not installed)"
    print(f"mvlm {mine}")
    print(f"llama.cpp {LLAMA_CPP_COMMIT} (vendored by llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}), with the patches:")
    for p in project_patches():
        print(f"  {p.name} (sha256 {p.sha256[:12]})")
    raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print mvlm's version, the pinned llama.cpp commit and its patches, and exit."),
) -> None:
    """Small vision-language models (MobileVLM and peers): checkpoint -> llama.cpp GGUF -> proof -> device latency."""


def _wire() -> None:
    from mvlm_bench.cli import runtime as runtime_cli
    from mvlm_convert.runtime_check_cli import check_cmd

    runtime_cli.app.command("check")(check_cmd)
    app.add_typer(runtime_cli.app, name="runtime", help="Build the pinned, patched llama.cpp for a target; print where it is.")

    from mvlm_convert.convert_cli import convert_cmd

    app.command("convert", help="Convert a released checkpoint to the language-model GGUF and the mmproj GGUF.")(
        convert_cmd
    )
    from mvlm_convert.verify_cli import verify_cmd

    app.command("verify", help="Prove the GGUFs compute what the PyTorch model computes (image embeddings, logits).")(
        verify_cmd
    )
    from mvlm_convert.quantize_cli import quantize_cmd

    app.command("quantize", help="Quantize a GGUF with llama.cpp's own quantizer; size/quality table.")(quantize_cmd)

    from mvlm_bench.cli import bench as bench_cli
    from mvlm_bench.cli.parse import parse_cmd

    bench_cli.app.command("parse", help="Parse saved llama.cpp output (any era since 2023) into timing records.")(
        parse_cmd
    )
    app.add_typer(
        bench_cli.app,
        name="bench",
        help="Run the papers' latency protocols on a device (or parse saved llama.cpp output) and report.",
    )
    from mvlm_bench.cli.devices import devices_cmd

    app.command("devices", help="List device profiles and check that each is reachable.")(devices_cmd)

    from mvlm_bench.cli.compare import compare_cmd

    app.command("compare", help="Compare two measurements (history selectors or bench JSON): speedups and verdicts.")(
        compare_cmd
    )
    from mvlm_bench.cli import history as history_cli

    app.add_typer(history_cli.app, name="history", help="List, plot, import, delete and prune stored measurements.")
    from mvlm_bench.cli.report import report_cmd

    app.command("report", help="Your stored latencies in a paper's table layout, beside its published rows.")(report_cmd)
    from mvlm_bench.cli.serve import serve_cmd

    app.command("serve", help="Serve a GGUF (+ mmproj) with llama-server's OpenAI API, here or on a device.")(serve_cmd)
    from mvlm_tune.cli import tune_cmd

    app.command("tune", help="The fastest configuration on a device within a fidelity budget: the latency/fidelity "
                "frontier of quantized variants.")(tune_cmd)


_help_type_labels()
_wire()

err_console = make_console(stderr=True)


def _json_file_alias(argv: list[str]) -> list[str]:
    """``mvlm bench ... --json FILE`` (the old spelling) -> ``--json-file FILE``, with one deprecation line on stderr.

    Only for ``bench`` (every other command's ``--json`` always was a flag), only when ``--json`` is followed by a
    value that is not an option, and never for ``bench parse`` (whose --json is a flag before its FILE arguments)."""
    if len(argv) < 2 or argv[1] != "bench" or "parse" in argv[2:argv.index("--") if "--" in argv else None]:
        return argv  # `bench parse` (its --json is a flag before its FILE arguments), wherever its --json stands
    out = list(argv)
    for i in range(2, len(out)):
        if out[i] == "--":
            break
        if out[i].startswith("--json=") or (out[i] == "--json" and i + 1 < len(out) and not out[i + 1].startswith("-")):
            out[i] = out[i].replace("--json", "--json-file", 1)
            err_console.print("[yellow]deprecated:[/] `mvlm bench --json FILE` is now `--json-file FILE` "
                              "(--json alone prints the JSON on stdout)", highlight=False, soft_wrap=True)
            break
    return out


MAX_ERROR_CHARS = 2000  # text a device or a file put into a message (a 30 MB getprop) stays one readable line


def clipped(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters left out)"


def repeated_options(argv: list[str]) -> str | None:
    """The first option given twice that keeps only one value (``--label x --label y``: typer would keep ``y``), as
    the line to refuse it with; None when there is none. Options that take a list (``-m A -m B``) may repeat."""
    import typer.main

    cmd = typer.main.get_command(app)
    counts: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            break
        sub = getattr(cmd, "commands", {}).get(tok) if not tok.startswith("-") else None
        if sub is not None:
            cmd, counts = sub, {}
            continue
        if not tok.startswith("-") or tok == "-":
            continue
        name, eq, value = tok.partition("=")
        param = next((p for p in cmd.params if name in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))),
                     None)
        if param is None:
            continue
        takes_value = not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        if takes_value and not eq and i < len(argv):
            value, i = argv[i], i + 1
        if getattr(param, "multiple", False) or getattr(param, "nargs", 1) != 1:
            continue
        seen = counts.setdefault(param.name or name, [])
        seen.append(f"{name} {value}".strip() if takes_value else name)
        if len(seen) > 1:
            return (f"{' and '.join(seen[:2])}: {param.opts[0]} is given twice and takes one value; give it once (a "
                    "script that appends options?)")
    return None


def _warn_password_in_argv(argv: list[str]) -> None:
    """A history URL with its password on the command line is readable by every local user for the whole command
    (``ps``, /proc/PID/cmdline): say so, and what to use instead. It still runs."""
    from mvlm_bench.history.locations import mask_url

    values = [v for i, a in enumerate(argv) for v in ([argv[i + 1]] if a == "--db" and i + 1 < len(argv) else
                                                       [a.partition("=")[2]] if a.startswith("--db=") else [])]
    if any("://" in v and mask_url(v) != v for v in values):
        err_console.print("[yellow]warning:[/] the --db URL carries a password, which every local user can read in "
                          "the process list while this runs: give the URL in $MVLM_HISTORY instead (only your user reads "
                          "a process's environment), or keep the password in ~/.pgpass or $PGPASSFILE (docs/lab.md)",
                          highlight=False, soft_wrap=True)


class QuietPipe:
    """stdout that a reader closing early (``mvlm ... | head -1``) cannot break: the first BrokenPipeError sends the
    rest to /dev/null, and the command goes on to its end, its messages on stderr and its exit code (a gate's 4)."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._to_null()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._to_null()

    def _to_null(self) -> None:
        self.broken = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())  # what is left in the stream's buffer goes nowhere, quietly
            os.close(null)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(stops=None) -> None:
    """Run the command line: user errors become one line and a non-zero exit code; a stop signal (Ctrl-C, SIGTERM,
    SIGHUP, SIGQUIT: ``mvlm_core.stops``) unwinds every ``finally`` and ends in one line, exit 128 + the signal.
    ``stops``: the handlers the entry point installed (and paused) first thing; else they are installed here."""
    from mvlm_core.stops import Stopped, StopSignals

    if stops is None:
        stops = StopSignals().install()
        stops.pause()
    sys.argv = _json_file_alias(sys.argv)
    if not isinstance(sys.stdout, QuietPipe) and sys.stdout is not None:
        sys.stdout = QuietPipe(sys.stdout)
    try:
        stops.resume()  # a signal that came while the command was starting up is raised here
        twice = repeated_options(sys.argv[1:])
        if twice:
            raise MvlmError(twice)
        if sys.argv[1:2] == ["bench"]:
            from mvlm_bench.plan.engine import not_offered

            refused = not_offered(sys.argv[2:])
            if refused:
                raise MvlmError(refused)
        _warn_password_in_argv(sys.argv[1:])
        rc = app(standalone_mode=False)
        stops.done()  # the command has finished: a signal now cannot cost it anything, nor change its exit code
        sys.exit(rc if isinstance(rc, int) else 0)
    except MvlmError as e:
        stops.done()
        from rich.markup import escape  # the message is text: a "[bold]" in a label or path stays as typed

        from mvlm_core.terminal import visible  # a path or name from a file: its escape sequences shown, not run

        err_console.print(f"[bold red]error:[/] {escape(clipped(visible(e)))}", highlight=False, soft_wrap=True)
        if e.detail:
            err_console.print(visible(e.detail, lines=True), highlight=False, markup=False)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            err_console.print(f"[bold red]error:[/] disk full while writing {e.filename or 'output'}: free space and retry")
            sys.exit(28)
        raise
    except Stopped as e:
        stops.done()
        err_console.print(f"[bold red]interrupted[/] by {e.name}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        # typer >= 0.2x vendors click (typer._click), older typer uses click itself: match by shape, not class
        names = {c.__name__ for c in type(e).__mro__}
        if "UsageError" in names:  # one line, as every other refusal (click prints a usage block and a blank line)
            from rich.markup import escape

            from mvlm_core.terminal import visible

            where = getattr(getattr(e, "ctx", None), "command_path", "") or "mvlm"
            said = " ".join(e.format_message().split())
            err_console.print(f"[bold red]error:[/] {escape(visible(said))} (see `{escape(where)} --help`)",
                              highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if "ClickException" in names:
            e.show()
            sys.exit(e.exit_code)
        if "Abort" in names:
            err_console.print("[bold red]aborted[/]")
            sys.exit(1)
        raise

if __name__ == "__main__":
    main()
