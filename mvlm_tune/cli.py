"""``mvlm tune``: the fastest configuration on a device that still computes the model, with the latency/fidelity
frontier it was chosen from (docs/tune.md)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import typer

from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError
from mvlm_tune import space

console = make_console()
err = make_console(stderr=True)
EXIT_NO_PICK = 1  # nothing measured is within the budget


def parse_duration(text: str | None) -> float | None:
    """``30m``, ``90s``, ``1.5h``, ``600`` (seconds) -> seconds; None: no limit."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise MvlmError(f"--time-limit {text!r}: give a duration such as 30m, 90s or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def tune_cmd(
    model: Path = typer.Argument(..., help="A released checkpoint directory (converted once to f16 GGUFs, cached), or "
                                 "the language-model GGUF (f16/f32, as `mvlm convert` writes it). Fidelity is measured "
                                 "against it; an already quantized GGUF needs --allow-requantize."),
    mmproj: Path | None = typer.Option(None, "--mmproj", help="The mmproj GGUF (vlm and imp protocols)."),
    device: str = typer.Option("local", "--device", "-d", help="Where latency is measured: a profile (devices/*.toml), "
                               "ssh://user@host or adb:SERIAL, as `mvlm bench --device`."),
    protocol: str = typer.Option(None, "--protocol", "-P", help="lm, vlm or imp (default: vlm with --mmproj, else lm)."),
    budget: str = typer.Option(space.DEFAULT_BUDGET, "--budget", help="Fidelity limits a recommendation must meet: "
                               "kl (max mean KL divergence vs the input LM, nats), top1 (min top-1 agreement), "
                               "image_cos (min mean image-embedding cosine vs the input mmproj); `none`: no limit."),
    lm_types: str = typer.Option(space.DEFAULT_LM_TYPES, "--lm-types", help="LM file types to try (llama-quantize's; "
                                 "`input`: the input file itself)."),
    mmproj_types: str = typer.Option(space.DEFAULT_MMPROJ_TYPES, "--mmproj-types", help="mmproj file types to try "
                                     "(q8_0, q5_1, q5_0, q4_1, q4_0, f16; `input`: the input mmproj itself)."),
    threads: str | None = typer.Option(None, "--threads", "-t", help="Thread counts to try, a comma list (default: "
                                       "the profile's)."),
    flash_attn: str | None = typer.Option(None, "--flash-attn", "-fa", help="Flash attention settings to try: a comma "
                                          "list of 0 (off) and 1 (on) (default: llama.cpp's)."),
    objective: str = typer.Option("total", "--objective", help="The latency to minimise: total (the papers' Total), "
                                  "ttft (vision encoder + prompt), eval (generation), ve (vision encoder)."),
    repeat: int = typer.Option(5, "--repeat", "-r", help="Runs each surviving candidate gets (the search drops the "
                               "others after fewer)."),
    time_limit: str | None = typer.Option(None, "--time-limit", help="Device time the search may spend (30m, 90s, "
                                          "1.5h; a bare number is seconds); the answer is given from what was "
                                          "measured by then."),
    n_predict: int | None = typer.Option(None, "--n-predict", "-n", help="Output tokens per run (the protocol's "
                                         "default otherwise)."),
    image: Path | None = typer.Option(None, "--image", help="Image for the runs and the mmproj fidelity (default: the "
                                      "built-in picture)."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Tune from an already quantized input "
                                          "(fidelity is then measured against that file, not the original model)."),
    cpu_variant: str | None = typer.Option(None, "--cpu-variant", help="Run this CPU variant of the device's build."),
    save: bool = typer.Option(True, "--save/--no-save", help="Keep every run in the history, labelled tune-SESSION."),
    db: str | None = typer.Option(None, "--db", help="History: a SQLite path or postgresql:// URL (default: "
                                  "$MVLM_HISTORY, else ./mvlm-history.sqlite)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the frontier plot here: DIR/tune.png and DIR/tune.html."),
    apply: Path | None = typer.Option(None, "--apply", help="Write the recommended files into this directory, with a "
                                      "device-profile snippet and the `mvlm serve` line."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (the table goes to stderr)."),
    json_file: Path | None = typer.Option(None, "--json-file", help="Write the result as JSON to this file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the rounds' shuffled order."),
    fresh: bool = typer.Option(False, "--fresh", help="Measure again instead of reading back the runs an earlier tune "
                               "made of the same files on the same device and build (the files are still reused)."),
) -> None:
    """Find the fastest configuration that stays within a fidelity budget: quantized variants of the LM (and mmproj),
    each one's fidelity measured once, latency measured on the device by successive halving (every candidate once,
    then only those not beaten beyond the noise), the latency/fidelity frontier and the recommendation, with its
    margin and whether that margin is beyond the noise."""
    from mvlm_tune.run import TuneOptions

    opts = TuneOptions(model=model, mmproj=mmproj, device=device, protocol=protocol,
                       budget=space.parse_budget(budget), objective=objective, repeat=repeat,
                       time_limit=parse_duration(time_limit), n_predict=n_predict, image=image,
                       allow_requantize=allow_requantize, cpu_variant=cpu_variant, save=save, db=db, seed=seed, fresh=fresh,
                       lm_types=space.parse_types(lm_types, _lm_types(), "--lm-types"),
                       mmproj_types=space.parse_types(mmproj_types, _mmproj_types(), "--mmproj-types")
                       if mmproj or model.is_dir() else None,
                       threads=space.parse_ints(threads, "--threads", 1, 1024),
                       flash_attn=space.parse_ints(flash_attn, "--flash-attn", 0, 1))
    if objective not in space.OBJECTIVES:
        raise MvlmError(f"--objective {objective!r}: choose one of {', '.join(space.OBJECTIVES)}")
    if repeat < 1 or repeat > 100:
        raise MvlmError(f"--repeat {repeat}: give 1 to 100")
    _check_outputs(apply, plot, json_file, [model, mmproj, image])
    data, pick_files = _run_with_status(opts)
    _show(data, json_, json_file)
    if plot is not None:
        _plot(data, plot)
    if data["recommendation"] is None:
        if apply is not None:
            err.print(f"--apply {apply}: nothing written (no recommendation)", highlight=False)
        raise typer.Exit(EXIT_NO_PICK)
    if apply is not None:
        _apply(data, apply, device, pick_files, err if json_ else console)


def _check_outputs(apply: Path | None, plot: Path | None, json_file: Path | None, inputs: list) -> None:
    """Every output place is checked before anything is quantized or measured (one line, exit 2)."""
    from mvlm_core.atomic import check_output_path, check_writable

    for option, d, probe in (("--apply", apply, "tune-profile.toml"), ("--plot", plot, "tune.png")):
        if d is None:
            continue
        if d.exists() and not d.is_dir():
            raise MvlmError(f"{option} {d}: not a directory; give a directory (made if missing)")
        check_writable(d / probe, option)
    if json_file is not None:
        check_output_path(str(json_file), [p for p in inputs if p is not None], option="--json-file")
        check_writable(json_file, "--json-file")


def _written(what: Path):
    """OSError while writing an output -> one line naming it."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except OSError as e:
            raise MvlmError(f"cannot write {what} ({e.strerror or e}); the runs are kept in the history and the tune "
                            "cache: the same command again writes it without measuring") from None

    return guard()


def _run_with_status(opts) -> tuple[dict, tuple | None]:
    """The tune with a live status line on a terminal (the round, the run, the candidate), its lines on stderr."""
    import contextlib

    from mvlm_tune.run import run_tune

    status = err.status("tune: preparing the variants") if err.is_terminal else contextlib.nullcontext()
    with status as live:
        def log(text: str) -> None:
            err.print(f"[dim]{text}[/]", highlight=False, soft_wrap=True)

        def on_step(step, point) -> None:
            if live is not None:
                live.update(f"tune: {step.label} of {point.candidate.key()} ({step.config + 1}/{step.configs} this "
                            "round)")

        return run_tune(opts, log=log, on_step=on_step)


def _lm_types() -> dict[str, float]:
    from mvlm_core.filetypes import LM_TYPES

    return LM_TYPES


def _mmproj_types() -> dict[str, float]:
    from mvlm_core.filetypes import MMPROJ_TYPES

    return MMPROJ_TYPES


def _show(data: dict, json_: bool, json_file: Path | None) -> None:
    import json

    from mvlm_tune.report import render_table, summary_lines

    render_table(err if json_ else console, data)
    for line in summary_lines(data):
        (err if json_ else console).print(line, highlight=False, soft_wrap=True)
    text = json.dumps(data, indent=2)
    if json_:
        print(text)
    if json_file is not None:
        from mvlm_core.atomic import AtomicOutputs

        with _written(json_file), AtomicOutputs() as outs:
            outs.path(json_file).write_text(text + "\n", encoding="utf-8")
            outs.commit()


def _plot(data: dict, out: Path) -> None:
    from mvlm_core.atomic import AtomicOutputs
    from mvlm_tune.report import html_page, plot

    with _written(out), AtomicOutputs() as outs:
        out.mkdir(parents=True, exist_ok=True)
        png = outs.path(out / "tune.png")
        plot(data, png)
        outs.path(out / "tune.html").write_text(html_page(data, png), encoding="utf-8")
        outs.commit()
    err.print(f"plot: {out / 'tune.png'}, {out / 'tune.html'}", highlight=False)


def _apply(data: dict, outdir: Path, device: str, files: tuple[Path, Path | None, space.Candidate], out) -> None:
    from mvlm_core.atomic import AtomicOutputs
    from mvlm_tune.report import profile_snippet, serve_line

    lm, mm, cand = files
    outdir = outdir.resolve()
    targets = [outdir / lm.name] + ([outdir / mm.name] if mm else [])
    with _written(outdir), AtomicOutputs() as outs:
        outdir.mkdir(parents=True, exist_ok=True)
        for src, dst in zip([lm, mm], targets, strict=False):
            if src is not None and not (dst.exists() and dst.resolve() == src.resolve()):
                shutil.copyfile(src, outs.path(dst))
        outs.path(outdir / "tune-profile.toml").write_text(profile_snippet(device, cand, data), encoding="utf-8")
        line = serve_line(device, targets[0], targets[1] if mm else None, cand)
        outs.path(outdir / "tune-serve.sh").write_text(f"#!/bin/sh\nexec {line}\n", encoding="utf-8")
        outs.commit()
        (outdir / "tune-serve.sh").chmod(0o755)
    out.print(f"applied: {', '.join(str(t) for t in targets)}, {outdir / 'tune-profile.toml'}, "
              f"{outdir / 'tune-serve.sh'}", highlight=False)
    out.print(f"serve it: {line}", highlight=False, soft_wrap=True)
