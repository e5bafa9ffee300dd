"""The family registry (mvlm_convert.families): every registered family's tiny checkpoint (its ``tiny_checkpoint``
hook) converts and its CLI summary renders, and the mmproj metadata every family writes is exactly the recorded one
(tests/data/mmproj-metadata.json: keys, values, tensor names, shapes and types)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from mvlm_convert.convert import convert
from mvlm_convert.families import families

GOLDEN = json.loads((Path(__file__).parent / "data" / "mmproj-metadata.json").read_text())
# golden entry -> (family, tiny_checkpoint keywords)
CASES = {
    "mobilevlm-v1": ("mobilevlm", {"variant": "v1"}),
    "mobilevlm-v2": ("mobilevlm", {"variant": "v2"}),
    "llava": ("llava", {}),
    "llava-hf5": ("llava", {"layout": "hf5"}),
    "xmodel": ("xmodel", {}),
    "imp": ("imp", {}),
    "imp15-qwen2": ("imp", {"lm": "qwen2"}),
    "imp15-phi3": ("imp", {"lm": "phi3"}),
}


def _family(name: str):
    return next(f for f in families() if f.name == name)


def _value(field):
    v = field.contents()
    if isinstance(v, float):
        return round(v, 7)
    if isinstance(v, list):
        return [round(x, 7) if isinstance(x, float) else x for x in v]
    return v


def test_every_registered_family_has_a_golden_case():
    assert {f.name for f in families()} == {fam for fam, _ in CASES.values()}
    assert set(CASES) == set(GOLDEN)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mmproj_metadata_is_unchanged(tmp_path, case):
    fam, kw = CASES[case]
    ckpt = _family(fam).tiny_checkpoint(tmp_path / case, **kw)
    res = convert(ckpt, tmp_path / "out", outtype="f16", progress=False)
    reader = gguf.GGUFReader(res.mmproj.path)
    kv = {f.name: _value(f) for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    prefix = str(tmp_path / case) + "/"
    kv = {k: v.replace(prefix, "<ckpt>/") if isinstance(v, str) else v for k, v in kv.items()}
    want = GOLDEN[case]
    assert sorted(kv) == sorted(want["kv"])
    assert kv == want["kv"]
    assert [[t.name, [int(x) for x in t.shape], t.tensor_type.name] for t in reader.tensors] == want["tensors"]


def test_each_family_tiny_checkpoint_converts_and_its_summary_renders(tmp_path):
    import typer
    from typer.testing import CliRunner

    from mvlm_convert.convert_cli import convert_cmd

    app = typer.Typer()
    app.command("convert")(convert_cmd)
    app.command("noop")(lambda: None)  # keep "convert" a sub-command
    for fam in families():
        ckpt = fam.tiny_checkpoint(tmp_path / fam.name)
        r = CliRunner().invoke(app, ["convert", str(ckpt), "-o", str(tmp_path / f"{fam.name}-out"), "--json"])
        assert r.exit_code == 0, (fam.name, r.output, r.exception)
        summary = json.loads(r.stdout)
        assert summary["family"] == fam.name
        assert all(Path(p).is_file() for p in summary["files"])
