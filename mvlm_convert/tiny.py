"""``python -m mvlm_convert.tiny OUT [--variant v2|v1|mobilellama] ...``: write a tiny MobileVLM-architecture
checkpoint (random weights, a trained SentencePiece tokenizer) for ``make demo`` and manual tries.

The maker is MobileVLM's ``tiny_checkpoint`` (``mvlm_convert.families.mobilevlm.make_tiny_checkpoint``); every
family's tiny checkpoint lives next to its family, the shared pieces in ``mvlm_convert.families.tiny_parts``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mvlm_convert.families.mobilevlm import VARIANTS, make_tiny_checkpoint
from mvlm_convert.families.tiny_parts import LAYOUTS

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvlm_convert.tiny",
                                 description="Write a tiny MobileVLM-architecture checkpoint (random weights).")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--variant", choices=list(VARIANTS), default="v2")
    ap.add_argument("--layout", choices=list(LAYOUTS), default="bin")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gqa", action="store_true", help="2 key/value heads instead of 4")
    ap.add_argument("--trap-3b", action="store_true", help="add the stale lit-gpt keys of the 3B configs")
    ap.add_argument("--clip-dir", type=Path, default=None, help="where to write the separate CLIP directory")
    args = ap.parse_args(argv)
    path = make_tiny_checkpoint(args.outdir, variant=args.variant, layout=args.layout, dtype=DTYPES[args.dtype],
                                seed=args.seed, trap_3b=args.trap_3b, clip_dir=args.clip_dir, gqa=args.gqa)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
