"""Cross-build checks: does a runtime built for another CPU (arm64, run here under qemu) compute what the host build does?

Greedy text is the wrong yardstick: two builds of the same llama.cpp use different SIMD kernels (x86 AVX vs arm64
NEON/dotprod), so their logits differ in the last bits and greedy decoding drifts apart after a few tokens (measured on
SmolLM2-135M: ~5 tokens). Perplexity over a fixed text averages thousands of such tiny differences into one number that
agrees across builds within well under 1% (measured: 0.02-0.9 %) — and moves by far more if a kernel is wrong. So:

- ``perplexity(target, model, text)``: ``llama-perplexity -c 128`` of the target's runtime on ``text`` (arm64 targets
  run through ``qemu-aarch64-static`` on a non-arm64 machine).
- ``compare_perplexity(...)``: host vs target, relative difference, pass if within ``PPL_TOLERANCE``.
- ``tiny_verify(...)``: the image-embedding / logits parity of ``mvlm verify`` on a tiny converted MobileVLM, once on
  the host runtime and once on the target's ``mvlm-dump`` (patch 0002), figures side by side.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mvlm_core import runtime as rtmod
from mvlm_core.backends import exec_wrapper_for
from mvlm_core.errors import MvlmError

PPL_TOLERANCE = 0.02  # relative; measured differences are 0.02-0.9 % depending on the text
PPL_CTX = 128

# A fixed English text (written for this project; no licence strings attached) of ~600 tokens: enough for a few
# 128-token perplexity chunks, short enough to run under qemu in about a minute.
DEFAULT_TEXT = """\
The lighthouse stood at the end of a narrow spit of rock, and for most of the year the only people who saw it up
close were the keeper and the men who brought him oil, bread and letters once a fortnight. In winter the boat often
could not come at all. The keeper kept a log of every ship he saw, the direction of the wind at dawn and at dusk, and
the height of the swell, which he judged by how far up the lower steps the water climbed.

His work was simple to describe and hard to do well. Every evening before sunset he climbed the one hundred and twelve
steps to the lantern room, trimmed the wick, polished the great lens until no smear remained on its glass, and lit the
lamp. Through the night he wound the clockwork that turned the lens, so that the beam swept the sea once every twenty
seconds. A ship's captain who counted the interval between flashes could tell which lighthouse he was looking at, and
from that, where his ship was.

People who visited in summer often asked whether he was lonely. He usually answered that he was too busy to be
lonely, which was partly true. There was always paint peeling somewhere, a gutter blocked by the nests of sea birds,
or a pane of glass cracked by a storm. He grew potatoes and onions in a small walled garden, and he read the same
few books many times over, until he could recite long passages from them while he worked.

Over the years the light changed. The oil lamp gave way to a brighter one that burned paraffin under pressure, and
later to an electric lamp fed by a generator that had to be started by hand. Each change made the light stronger and
the keeper's nights a little easier. Finally the lamp was made to switch itself on at dusk and off at dawn, and a
radio beacon was added that ships could find even in thick fog. The keeper was told that he was no longer needed.

On his last evening he climbed the steps one more time, although there was nothing left for him to do. He watched the
lamp come on by itself, and he stayed until the first ship of the night passed safely to the north. Then he went down,
locked the door behind him, and left the key under the stone by the gate, where the engineers had asked him to leave
it. The light went on turning without him, exactly as it had been built to do.
"""


_PPL_RE = re.compile(r"Final estimate:\s*PPL\s*=\s*([0-9.]+|nan|inf)", re.I)


def parse_perplexity(output: str) -> float:
    """The final PPL estimate from llama-perplexity's output."""
    m = _PPL_RE.search(output)
    if not m:
        raise MvlmError("llama-perplexity printed no 'Final estimate: PPL = ...' line (output tail below)",
                        detail="\n".join(output.splitlines()[-15:]))
    return float(m.group(1))


def perplexity(target: str, model: Path, text: str = DEFAULT_TEXT, ctx: int = PPL_CTX, chunks: int | None = None,
               threads: int | None = None, timeout: float = 900.0, cpu_variant: str | None = None,
               qemu_cpu: str | None = None) -> float:
    """``llama-perplexity -c ctx`` of ``target``'s built runtime on ``text`` with ``model``; returns the final PPL.

    ``chunks`` limits the evaluation to the first N chunks of ``ctx`` tokens (qemu runs ~4 tokens/s of SmolLM2).
    ``cpu_variant``: that build of the target; ``qemu_cpu``: the CPU model qemu emulates for an arm64 target.
    """
    rt = rtmod.find(target, cpu_variant=cpu_variant)
    exe = rt.exe("llama-perplexity")
    if not exe.is_file():
        raise MvlmError(f"the {target} runtime at {rt.root} has no llama-perplexity: rebuild it "
                        f"(`mvlm runtime build --target {target}`)")
    if not Path(model).is_file():
        raise MvlmError(f"model not found: {model}")
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    with tempfile.TemporaryDirectory(prefix="mvlm-ppl-") as td:
        txt = Path(td) / "text.txt"
        txt.write_text(text, encoding="utf-8")
        argv = [*exec_wrapper_for(target, qemu_cpu), str(exe), "-m", str(model), "-f", str(txt), "-c", str(ctx),
                "-b", str(ctx), "-t", str(threads), "-ngl", "0"]
        if chunks:
            argv += ["--chunks", str(chunks)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
        except subprocess.TimeoutExpired as e:
            raise MvlmError(f"llama-perplexity ({target}) ran past {timeout:.0f} s: use a shorter text") from e
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise MvlmError(f"llama-perplexity ({target}) exited with status {r.returncode} (output tail below)",
                        detail="\n".join(out.splitlines()[-15:]))
    return parse_perplexity(out)


@dataclass
class PerplexityCheck:
    target: str
    host_ppl: float
    target_ppl: float
    rel_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.tolerance


def compare_perplexity(target: str, model: Path, text: str = DEFAULT_TEXT, tolerance: float = PPL_TOLERANCE,
                       chunks: int | None = None, cpu_variant: str | None = None,
                       qemu_cpu: str | None = None) -> PerplexityCheck:
    """Perplexity of the host build and of ``target``'s build on the same text; relative difference to the host's."""
    host = perplexity("host", model, text, chunks=chunks)
    other = perplexity(target, model, text, chunks=chunks, cpu_variant=cpu_variant, qemu_cpu=qemu_cpu)
    return PerplexityCheck(target, host, other, abs(other - host) / host, tolerance)


def tiny_verify(target: str, workdir: Path, variant: str = "v2", cpu_variant: str | None = None,
                qemu_cpu: str | None = None) -> dict[str, dict]:
    """Convert a tiny MobileVLM checkpoint (f32) and run ``mvlm verify`` on the host runtime and on ``target`` (its
    ``cpu_variant`` build, under qemu's ``qemu_cpu`` model for an arm64 target): {"host": figures, "TARGET[ VARIANT]":
    figures}."""
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint
    from mvlm_convert.verify import verify

    workdir = Path(workdir)
    ckpt = make_tiny_checkpoint(workdir / variant, variant=variant, seed=0)
    res = convert(ckpt, workdir / f"{variant}-f32", outtype="f32", progress=False)
    mmproj = res.mmproj.path if res.mmproj else None
    other = target
    if cpu_variant or qemu_cpu:
        from mvlm_core.backends import BinaryBackend, exec_wrapper_for

        other = BinaryBackend(target, exec_wrapper=exec_wrapper_for(target, qemu_cpu), cpu_variant=cpu_variant)
    figs = {"host": verify(ckpt, res.lm.path, mmproj, runtime="host")}
    figs[target + (f" {cpu_variant}" if cpu_variant else "")] = verify(ckpt, res.lm.path, mmproj, runtime=other)
    return figs
