"""Benchmark: the bounded GGUF header reader (mvlm_core.gguf_header) on hostile and real files: its cost is bounded by
the header's real size, never by what the header claims.

Files (written to a temporary directory): crafted headers that claim what they do not hold (an array of 2^64-1 u8,
a string of 2^63 bytes, 2^62 tensors), headers that are large for real (N MB of empty strings in one array, for
N = 10 and 100 by default: 1.3 M and 13 M strings, the second refused past 2 M strings), and the real SmolLM2 GGUF.
Each is read in a fresh child process, which reports the read time and its peak RSS growth (resource.getrusage).

The anchor, in the same run: gguf-py's own GGUFReader on the same real GGUF (what every command used before); the
ratio to it is what to watch across machines. The requirement (issue 24): at most 1 s and 100 MB on any file of at
most 100 MB.

    python benchmarks/gguf_header.py [--sizes 10 100] [--json-file out.json]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
which, path = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
outcome = "read"
try:
    if which == "gguf-py":
        import gguf
        gguf.GGUFReader(path)
    else:
        from mvlm_core.gguf_header import GgufError, read_header
        read_header(path)
except Exception as e:  # GgufError: refused, as it should for the crafted files
    outcome = "refused: " + str(e)[:70]
dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "rss_growth_mb": (after - before) / 1024, "outcome": outcome}))
"""


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def _gguf(*parts: bytes, tensors: int = 0, keys: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, keys) + b"".join(parts)


def files(d: Path, sizes: list[int]) -> dict[str, Path]:
    out = {}
    crafted = {
        "u8 array of 2^64-1 items (98 B)": _gguf(_key("a"), struct.pack("<IIQ", 9, 0, 2**64 - 1)),
        "string of 2^63 bytes": _gguf(_key("a"), struct.pack("<IQ", 8, 2**63)),
        "2^62 tensors": _gguf(tensors=2**62, keys=0),
    }
    for name, data in crafted.items():
        p = d / f"{len(out)}.gguf"
        p.write_bytes(data)
        out[name] = p
    for mb in sizes:
        n = mb * 1_000_000 // 8
        p = d / f"strings-{mb}.gguf"
        with open(p, "wb") as f:
            f.write(_gguf(_key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, n)))
            for _ in range(n // 100_000):
                f.write(bytes(8 * 100_000))
            f.write(bytes(8 * (n % 100_000)))
        out[f"{mb} MB of empty strings ({n:,})"] = p
    return out


def run(which: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"seconds": None, "rss_growth_mb": None, "outcome": f"crashed: {r.stderr.strip()[-120:]}"}
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--json-file", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mvlm_core.assets import smollm2_gguf

    real = smollm2_gguf()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mvlm-gguf-bench-") as td:
        cases = files(Path(td), args.sizes)
        anchor = [run("gguf-py", real) for _ in range(3)]
        ours_real = [run("mvlm", real) for _ in range(3)]
        a = sorted(x["seconds"] for x in anchor)[1]
        o = sorted(x["seconds"] for x in ours_real)[1]
        rows.append({"file": f"{real.name} (real)", "mvlm_s": o, "gguf_py_s": a, "ratio": o / a,
                     "rss_growth_mb": max(x["rss_growth_mb"] for x in ours_real), "outcome": ours_real[0]["outcome"]})
        for name, p in cases.items():
            r = run("mvlm", p)
            rows.append({"file": name, "mvlm_s": r["seconds"], "gguf_py_s": None, "ratio": None,
                         "rss_growth_mb": r["rss_growth_mb"], "outcome": r["outcome"]})
    print(f"{'file':42} {'mvlm s':>8} {'gguf-py s':>9} {'ratio':>6} {'RSS +MB':>8}  outcome")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "–".rjust(int(fmt.split(".")[0]))
        print(f"{r['file'][:42]:42} {f(r['mvlm_s'], '8.3f')} {f(r['gguf_py_s'], '9.3f')} {f(r['ratio'], '6.2f')} "
              f"{f(r['rss_growth_mb'], '8.1f')}  {r['outcome']}")
    worst = max((r["mvlm_s"] or 0) for r in rows)
    worst_mb = max((r["rss_growth_mb"] or 0) for r in rows)
    print(f"\nworst: {worst:.3f} s, {worst_mb:.1f} MB (requirement: <= 1 s and <= 100 MB on files up to 100 MB)")
    if args.json_file:
        args.json_file.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
