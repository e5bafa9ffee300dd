"""``mvlm serve``: llama-server (OpenAI-compatible HTTP API) for an LM GGUF and its mmproj, here or on a device."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mvlm_bench.session.front import Limits
from mvlm_core.console import console as make_console

err = make_console(stderr=True)

_REMOTE_IMAGES = typer.Option(False, "--allow-remote-images", help="Let llama-server fetch http(s) image URLs from its "
                              "own host (off: data URIs only).")
_CPU_VARIANT = typer.Option(None, "--cpu-variant", help="Run this CPU variant of the device's build (arm64: armv8.0, "
                            "dotprod, i8mm, dotprod+kleidiai, i8mm+kleidiai; host: native, generic) instead of the "
                            "fastest its probed CPU runs (docs/devices.md).")


def serve_cmd(
    model: Path | None = typer.Option(None, "--model", "-m", help="The language-model GGUF."),
    mmproj: Path | None = typer.Option(None, "--mmproj", help="The mmproj GGUF (images in chat messages); leave it "
                                                              "out to serve a text-only model."),
    device: str = typer.Option("local", "--device", "-d", help="Where the server runs: local (this machine), a profile "
                                                               "name or .toml, ssh://user@host[:port] or adb:SERIAL."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on here (0.0.0.0 or ::: every interface; "
                                                          "then give an API key). llama-server itself listens on its "
                                                          "device's 127.0.0.1 only."),
    port: int = typer.Option(8080, "--port", help="TCP port to listen on here."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads (default: the profile's; locally "
                                                                     "all cores)."),
    ctx_size: int = typer.Option(4096, "--ctx-size", "-c", help="Context size in tokens, shared by the server's slots."),
    n_gpu_layers: int | None = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (default: the "
                                                                                 "profile's)."),
    alias: str | None = typer.Option(None, "--alias", help="Model name the API reports (default: the GGUF's file "
                                                           "name without .gguf); requests may name any model."),
    log: Path | None = typer.Option(None, "--log", help="Server log file, appended to, never through a symlink "
                                                    "(default: ~/.cache/mvlm/logs/serve-*.log)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the model to load (1 to 86400)."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File of API keys, one per line (# starts "
                                                                         "a comment): requests must send one as "
                                                                         "'Authorization: Bearer KEY' (401 otherwise)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="MVLM_API_KEY", show_envvar=True,
                                       help="One API key. On the command line it is readable by every local user: "
                                            "prefer --api-key-file or the environment variable."),
    max_image_pixels: int = typer.Option(Limits.max_pixels, "--max-image-pixels", help="Largest image a request may "
                                                                                       "carry, in pixels (400 beyond)."),
    max_body_mb: int = typer.Option(Limits.max_body >> 20, "--max-body-mb", help="Largest request body, MiB (413 "
                                                                                 "beyond)."),
    max_concurrent: int | None = typer.Option(None, "--max-concurrent", help="Requests handled at once (503 with "
                                                                              "Retry-After beyond; default 8, or "
                                                                              "--parallel when more)."),
    allow_remote_images: bool = _REMOTE_IMAGES,
    parallel: int | None = typer.Option(None, "--parallel", "-np", help="llama-server's slots: requests decoded at "
                                                                        "once, sharing --ctx-size (default: "
                                                                        "llama-server's)."),
    cpu_variant: str | None = _CPU_VARIANT,
    server_args: list[str] | None = typer.Argument(None, metavar="[-- LLAMA_SERVER_ARGS...]",
                                                   help="After --: options passed to llama-server unchanged (e.g. "
                                                        "-- -fa on --cache-type-k q8_0); those mvlm sets itself are "
                                                        "refused, naming mvlm's option."),
) -> None:
    """Serve a GGUF with llama.cpp's llama-server (OpenAI-compatible /v1/chat/completions, images as data URIs).

    Waits until the server is ready, prints its URL and the OpenAI base URL, and runs until Ctrl-C, SIGTERM, SIGHUP
    or SIGQUIT (exit 0; the server is stopped and reaped; a second signal kills it at once). On an ssh device the
    runtime and models are pushed first and a local port is forwarded to the server there. Requests pass a front
    door here that refuses oversized images and bodies, remote image URLs and, with a key, unauthenticated
    clients. Examples:

      mvlm serve --model MobileVLM_V2-1.7B-Q4_K_S.gguf --mmproj mmproj-MobileVLM_V2-1.7B-F16.gguf

      mvlm serve --device orin --model M-Q4_K_S.gguf --mmproj mmproj-M-F16.gguf --port 8081

      mvlm serve --model M-Q4_K_S.gguf --mmproj mmproj-M-F16.gguf -np 4 -- -fa on
    """
    from mvlm_bench.session import serve
    from mvlm_core.terminal import visible

    spec, notes = _spec(model, mmproj, host, port, threads, ctx_size, n_gpu_layers, alias, log, timeout, api_key_file,
                        api_key, max_image_pixels, max_body_mb, max_concurrent, allow_remote_images, parallel,
                        server_args)
    from mvlm_bench.device.cpu_features import with_cpu_variant

    profile = with_cpu_variant(_profile(device), cpu_variant)
    on_ready = _announcer(spec, notes)

    def say(msg: str) -> None:
        err.print(visible(msg), style="dim", highlight=False, markup=False, soft_wrap=True)

    # Ctrl-C, SIGTERM, SIGHUP and SIGQUIT stop the server (also where SIGINT was ignored at start-up: a job started
    # with `&` by a script); a device that cannot forward a port (adb) is refused there
    stopped = serve.serve(profile, spec, on_ready, log=say)
    if stopped:
        try:
            print("stopped", flush=True)
        except OSError:  # SIGHUP: the terminal is gone
            pass


def _spec(model, mmproj, host, port, threads, ctx_size, n_gpu_layers, alias, log, timeout, api_key_file, api_key,
          max_image_pixels, max_body_mb, max_concurrent, allow_remote_images, parallel, server_args):
    """The options as a checked ServeSpec (one line, exit 2, for any that is wrong) and the notes to print once the
    server is ready."""
    from mvlm_bench.session import serve
    from mvlm_core.errors import MvlmError

    if model is None:
        raise MvlmError("no model given: pass --model FILE.gguf (and --mmproj mmproj-FILE.gguf for images)")
    if not (1 <= timeout <= 86400):  # NaN and inf too
        raise MvlmError(f"--timeout {timeout:g} is out of range: give the seconds to wait for the model to load, at least 1 "
                        "and at most 86400 (a day)")
    if server_args and "--" not in sys.argv:
        raise MvlmError(f"unexpected argument {server_args[0]!r}: the model is --model FILE; options for llama-server "
                        "go after -- (mvlm serve --model M.gguf -- -fa on)")
    if max_concurrent is None:  # as many requests at once as llama-server has slots for, at least the default
        max_concurrent = max(Limits.max_concurrent, min(parallel or 0, serve.MAX_PARALLEL))  # --parallel: its own check
    limits = serve.make_limits(max_image_pixels, max_body_mb, max_concurrent, allow_remote_images,
                               serve.api_keys(api_key, api_key_file))
    spec = serve.ServeSpec(model=model, mmproj=mmproj, host=host, port=port, threads=threads, ctx_size=ctx_size,
                           n_gpu_layers=n_gpu_layers, alias=alias, log=log, ready_timeout=timeout, limits=limits,
                           parallel=parallel, server_args=serve.check_server_args(server_args or ()))
    notes = serve.check_spec(spec, key_on_command_line=any(
        a == "--api-key" or a.startswith("--api-key=") for a in sys.argv))
    return spec, notes


def _profile(device: str):
    from mvlm_bench.device.profiles import load_profile, profile_from_dict
    from mvlm_core.errors import MvlmError

    if device.strip() != "local":
        return load_profile(device)
    try:
        return load_profile("local")
    except MvlmError:  # an installed package without the repo's devices/: this machine, host runtime
        return profile_from_dict({"transport": "local", "target": "host"}, where="--device local", default_name="local")


def _announcer(spec, notes: list[str]):
    """What serve prints once the server answers: plain lines, flushed (scripts and tests read them from a pipe);
    names from files with their control characters shown, never sent to the terminal."""
    from mvlm_core.terminal import visible

    def on_ready(s) -> None:
        print(f"llama-server ready on {visible(s.device)} in {s.ready_s:.1f} s\n  URL:             {s.url}\n"
              f"  OpenAI base URL: {s.url}/v1\n  model (alias):   {visible(s.alias)}\n  server log:      "
              f"{visible(s.log)}\n  limits:          {spec.limits.describe()}", flush=True)
        for note in notes:  # after start-up: a refusal stays one line
            err.print(f"[yellow]note:[/] {visible(note, markup=True)}", highlight=False, soft_wrap=True)
        print("Ctrl-C stops it.\n", end="", flush=True)  # one write: a stop signal cannot split it from its newline

    return on_ready
