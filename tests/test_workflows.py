"""The GitHub workflows: valid against GitHub's schema, and the device lab's semantics a schema cannot see.

Schema: check-jsonschema's vendored GitHub-workflow schema, run as its real CLI on every file. Semantics of
device-lab.yml (docs/lab.md): every `mvlm` command line in it is parsed by mvlm's real command-line parser (unknown
options and badly typed values fail), the plan step is run for real with bash (device choice, profiles, refusals),
the gate job needs the device matrix and runs the real summary script over verdict files, and secrets reach steps
only through `env:` and are never printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer.main
import yaml

from mvlm.cli import app

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
LAB = ROOT / ".github" / "workflows" / "device-lab.yml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
PROFILES = {p.stem: tomllib.loads(p.read_text()) for p in (ROOT / "devices").glob("*.toml")}


def load(path: Path) -> dict:
    # PyYAML reads the key `on` as the boolean True (YAML 1.1); give it its GitHub name back
    doc = yaml.safe_load(path.read_text())
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=60)


def steps(doc: dict):
    """(job id, job, step) for every step of every job."""
    for job_id, job in doc["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, job, step


def step_named(doc: dict, job_id: str, step_id: str) -> dict:
    return next(s for s in doc["jobs"][job_id]["steps"] if s.get("id") == step_id or s.get("name") == step_id)


def run_step(doc: dict, job_id: str, step: dict, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run a step's script as GitHub does (bash -e), with the workflow's, the job's and the step's plain env values."""
    # python3 is the venv's (>= 3.11, like ubuntu-latest's: the plan step needs tomllib)
    full = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/root")}
    for scope in (doc.get("env", {}), doc["jobs"][job_id].get("env", {}), step.get("env", {})):
        full.update({k: str(v) for k, v in scope.items() if "${{" not in str(v)})
    full.update(env)
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=60)


def plan(tmp_path: Path, devices_input: str) -> tuple[subprocess.CompletedProcess, dict]:
    doc = load(LAB)
    out = tmp_path / "github_output"
    out.write_text("")
    r = run_step(doc, "plan", step_named(doc, "plan", "plan"), {"DEVICES_INPUT": devices_input, "GITHUB_OUTPUT": str(out)},
                 ROOT)
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines())
    return r, outputs


# ---------------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_matches_githubs_schema(path):
    r = schema_check(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation done" in r.stdout


def test_the_schema_check_rejects_a_broken_workflow(tmp_path):
    """The check above can fail: the lab workflow with a job that has a step both `uses` and `run` and no runner."""
    doc = load(LAB)
    del doc["jobs"]["gate"]["runs-on"]
    doc["jobs"]["gate"]["steps"][0]["run"] = "true"
    bad = tmp_path / "device-lab.yml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = schema_check(bad)
    assert r.returncode != 0 and "$.jobs.gate" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------- mvlm lines

EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
SHELL_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def sample(expr: str, matrix: dict) -> str:
    """A value an expression can take: a matrix value, else the last literal it names (`a || '5%'`), else x."""
    m = re.fullmatch(r"matrix\.(\w+)", expr)
    if m and m.group(1) in matrix:
        return str(matrix[m.group(1)])
    literals = re.findall(r"'([^']*)'", expr)
    return literals[-1] if literals else "x"


def mvlm_lines(doc: dict, matrix: dict) -> list[tuple[str, list[str]]]:
    """Every `mvlm` command in the workflow's scripts: (the line as written, argv after the shell would expand it)."""
    found = []
    for job_id, job, step in steps(doc):
        if "run" not in step:
            continue
        env = {}
        for scope in (doc.get("env", {}), job.get("env", {}), step.get("env", {})):
            env.update({k: EXPR.sub(lambda m: sample(m.group(1), matrix), str(v)) for k, v in scope.items()})
        script = step["run"].replace("\\\n", " ")
        assert script.count("bin/mvlm") == len(re.findall(r"^\s*(?:\.venv/)?bin/mvlm\s", script, re.M)), (
            f"{job_id}: an mvlm call that does not start its line (the check below would miss it):\n{script}")
        for line in script.splitlines():
            if not re.match(r"\s*(?:\.venv/)?bin/mvlm\s", line):
                continue
            text = EXPR.sub(lambda m: sample(m.group(1), matrix), line)
            text = SHELL_VAR.sub(lambda m, env=env: env.get(m.group(1) or m.group(2), "x"), text)
            lex = shlex.shlex(text, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            argv = []
            for tok in lex:
                if set(tok) <= set("();<>|&"):
                    break  # the command ends at the first || ; > | &&
                argv.append(tok)
            found.append((line.strip(), argv[1:]))
    return found


def parse(argv: list[str]):
    """mvlm's own parser (the typer app's click command), down to the sub-command; nothing is run."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("mvlm", list(argv))
    while hasattr(cmd, "resolve_command"):
        rest = list(getattr(ctx, "_protected_args", [])) + list(ctx.args)
        if not rest:
            break
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


@pytest.fixture(scope="module")
def lab_matrix(tmp_path_factory) -> dict:
    r, outputs = plan(tmp_path_factory.mktemp("plan"), "")
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(outputs["matrix"])


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_mvlm_command_in_a_workflow_parses(path, lab_matrix):
    doc = load(path)
    matrices = [job["strategy"]["matrix"] for job in doc["jobs"].values()
                if isinstance(job.get("strategy", {}).get("matrix"), dict)]
    entries = [e for m in matrices for e in m.get("include", [])] or lab_matrix["include"]
    lines = []
    for entry in entries:
        lines += mvlm_lines(doc, entry)
    assert lines, f"{path.name}: no mvlm command found"
    for line, argv in lines:
        try:
            ctx = parse(argv)
        except Exception as e:  # click's UsageError / BadParameter, whichever click typer vendors
            pytest.fail(f"{path.name}: `{line}` does not parse as {argv}: {e}")
        assert ctx.command.callback is not None


def test_the_lab_runs_each_step_of_the_recipe(lab_matrix):
    """The lab workflow builds, converts, benches with the recommended gate, and summarises from the history."""
    doc = load(LAB)
    parsed = [(line, parse(argv)) for line, argv in mvlm_lines(doc, lab_matrix["include"][0])]
    names = {" ".join(c.command_path.split()[1:]) for _, c in parsed}
    assert {"runtime build", "convert", "quantize", "bench", "compare", "history", "history plot"} <= names, names
    benches = [c.params for _, c in parsed if c.command_path == "mvlm bench"]
    # saved to the lab's history: $MVLM_HISTORY (the job's env), never a --db on the command line
    assert benches and all(p["save"] and p["db_arg"] is None and p["device"] != "local" for p in benches), benches
    gated = [p for p in benches if p["fail_on_regression"]]
    # docs/ci.md: gate in `mvlm bench` against a stored baseline (confirmed by an interleaved re-run), never by
    # `mvlm compare --fail-on-regression` alone (3/15 false alarms, 11/15 caught, against 0/15 and 15/15)
    assert gated and all(p["baseline"] == "label:main" for p in gated), gated
    compares = [c.params for _, c in parsed if c.command_path == "mvlm compare"]
    assert compares and not any(p["fail_on_regression"] for p in compares)


def test_the_parse_check_catches_an_unknown_option_and_a_bad_value(lab_matrix):
    doc = load(LAB)
    step = step_named(doc, "gate", "Summary and verdict over every device")
    original = step["run"]
    for wrong, message in (("--limits 10", "No such option: --limits"), ("--limit many", "valid integer")):
        step["run"] = original.replace("--limit 10", wrong)
        bad = [argv for line, argv in mvlm_lines(doc, lab_matrix["include"][0]) if wrong in line]
        assert bad
        with pytest.raises(Exception, match=message):
            parse(bad[0])


# ---------------------------------------------------------------------------------------------------- devices


def test_lab_devices_are_profiles_and_runner_labels_follow_them(lab_matrix):
    doc = load(LAB)
    lab = doc["env"]["LAB_DEVICES"].split()
    assert lab and set(lab) <= set(PROFILES), f"LAB_DEVICES {lab} not all in devices/: {sorted(PROFILES)}"
    assert [e["device"] for e in lab_matrix["include"]] == lab
    for entry in lab_matrix["include"]:
        target = PROFILES[entry["device"]]["target"]
        assert entry["target"] == target
        expected = ["--target", target] + (["--device", entry["device"]] if target == "orin" else [])
        assert entry["build_args"].split() == expected
    assert doc["jobs"]["bench"]["runs-on"] == ["self-hosted", "mvlm-${{ matrix.device }}"]
    docs = (ROOT / "docs" / "lab.md").read_text()
    for label in [f"mvlm-{d}" for d in lab] + [doc["jobs"]["gate"]["runs-on"][1]]:
        assert f"`{label}`" in docs, f"runner label {label} is not documented in docs/lab.md"


def test_a_manual_run_measures_the_devices_asked_for(tmp_path):
    r, outputs = plan(tmp_path, "sd888, orin")
    assert r.returncode == 0, r.stderr
    assert outputs["devices"] == "sd888 orin"
    assert [e["device"] for e in yaml.safe_load(outputs["matrix"])["include"]] == ["sd888", "orin"]


@pytest.mark.parametrize("asked", ["nope", "orin,../../etc/passwd", "$(touch INJECTED)", "orin;touch INJECTED"])
def test_a_manual_run_refuses_what_is_not_a_profile(tmp_path, asked):
    r, outputs = plan(tmp_path, asked)
    assert r.returncode != 0 and not outputs
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not a device profile" in lines[0], r.stderr
    assert "sd888" in lines[0]  # names the profiles there are
    assert not (ROOT / "INJECTED").exists() and not (tmp_path / "INJECTED").exists()


# ---------------------------------------------------------------------------------------------------- gate job


def test_the_gate_job_needs_the_matrix_and_runs_when_a_device_failed():
    doc = load(LAB)
    bench, gate = doc["jobs"]["bench"], doc["jobs"]["gate"]
    assert "bench" in gate["needs"] and "plan" in bench["needs"]
    assert bench["strategy"]["fail-fast"] is False
    assert "!cancelled()" in gate["if"] or "always()" in gate["if"]
    # one job per device at a time, shared with the older per-device workflow
    assert bench["concurrency"] == {"group": "device-${{ matrix.device }}", "cancel-in-progress": False}
    old = load(ROOT / ".github" / "workflows" / "device-latency.yml")
    assert old["jobs"]["bench"]["concurrency"]["group"] == bench["concurrency"]["group"]


def gate_summary(tmp_path: Path, verdicts: dict[str, str], label: str, devices: str = "orin sd888 sd8gen3"):
    doc = load(LAB)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "lab").mkdir()
    for device, rc in verdicts.items():
        (tmp_path / "lab" / f"verdict-{device}.txt").write_text(rc + "\n")
    summary = tmp_path / "summary.md"
    step = step_named(doc, "gate", "Summary and verdict over every device")
    r = run_step(doc, "gate", step, {"DEVICES": devices, "LABEL": label, "GITHUB_STEP_SUMMARY": str(summary),
                                     "MVLM_HISTORY": str(tmp_path / "history.sqlite")}, tmp_path)
    return r, summary.read_text()


@pytest.mark.slow
def test_the_gate_fails_on_a_regression_or_a_missing_device(tmp_path):
    """A PR whose sd888 bench said "regression" (exit 4) and an sd8gen3 that reported nothing; the summary shows the
    real comparison and history of sd888 from the history (llama-bench output stored as main, and a copy 30% slower
    as the PR)."""
    from mvlm_bench.history.database import History
    from mvlm_bench.history.imports import entries_from_json

    def import_cmd(files, db, device, label):  # what `mvlm history import FILE --device D --label L` stores
        entries = [e for f in files for e in entries_from_json(f, device=device)]
        for e in entries:
            e.label = label
        with History(db) as h:
            h.save_new(entries)

    report = ROOT / "tests" / "data" / "llama-bench" / "smollm2-q4_1-p8-n4-r2.json"
    rows = json.loads(report.read_text())
    for row in rows:
        row["samples_ts"] = [v * 0.7 for v in row["samples_ts"]]
        row["samples_ns"] = [round(v / 0.7) for v in row["samples_ns"]]
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(rows))
    db = tmp_path / "history.sqlite"
    import_cmd([report], db=db, device="sd888", label="main")
    import_cmd([slower], db=db, device="sd888", label="pr-7")
    r, summary = gate_summary(tmp_path, {"sd888": "4"}, "pr-7", devices="sd888 sd8gen3")
    assert r.returncode == 1, r.stderr
    assert "## sd888: **regression**" in summary and "## sd8gen3: **no result**" in summary
    sd888, sd8gen3 = summary.split("## sd8gen3")
    tests = [f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}" for row in rows]
    for test in tests:  # the comparison table of main vs the PR, one row per llama-bench test, 30% slower
        assert re.search(rf"\| {test} \(tokens/s\) \|.*\| 0\.700 \|", sd888), sd888
    assert "label main" in sd888 and "pr-7" in sd888.split("```")[1]  # the history block lists the PR's entry
    assert "_no comparison with main" in sd8gen3  # no entry of sd8gen3: said, not an error
    assert summary.count("```") == 4  # each device's history block opened and closed, whatever the history said


@pytest.mark.slow
def test_the_gate_fails_on_a_busy_device_or_a_failed_measurement(tmp_path):
    r, summary = gate_summary(tmp_path, {"sd888": "75", "orin": "3"}, "main", devices="sd888 orin")
    assert r.returncode == 1, r.stderr
    assert "## sd888: **device busy**" in summary and "## orin: **measurement failed** (exit 3)" in summary


@pytest.mark.slow
def test_the_gate_passes_when_every_device_passed(tmp_path):
    r, summary = gate_summary(tmp_path, {"orin": "0", "sd888": "0", "sd8gen3": "0"}, "main")
    assert r.returncode == 0, r.stderr
    assert summary.count(": passed") == 3 and "regression" not in summary


# ---------------------------------------------------------------------------------------------------- secrets


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_secrets_reach_steps_only_through_env_and_are_never_printed(path):
    doc = load(path)
    for job_id, _job, step in steps(doc):
        script = step.get("run", "")
        assert "secrets." not in script, f"{path.name}/{job_id}: a secret expanded into a script"
        assert not re.search(r"\bset\s+-\w*x", script), f"{path.name}/{job_id}: `set -x` would print the secret"
    if path != LAB:
        return
    for job in ("bench", "gate"):
        assert doc["jobs"][job]["env"]["MVLM_HISTORY"] == "${{ secrets.MVLM_HISTORY }}"
    for job_id, _job, step in steps(doc):
        script = step.get("run", "")
        # no expression at all inside a script: inputs, branch names and secrets arrive as environment variables
        assert "${{" not in script, f"{job_id}: an expression inside a script: {step.get('name')}"
        for line in script.replace("\\\n", " ").splitlines():
            # mvlm reads $MVLM_HISTORY itself: the URL (maybe with its password) never reaches a command line, where
            # every local user could read it for the whole bench (/proc/PID/cmdline); only its presence is tested
            assert "--db" not in line or "MVLM_HISTORY" not in line, f"{job_id}: the history URL on a command line: {line}"
            used = re.sub(r'\[ -[zn] "\$MVLM_HISTORY" \]', "", line)
            assert "$MVLM_HISTORY" not in used and "${MVLM_HISTORY" not in used, (
                f"{job_id}: MVLM_HISTORY used as more than a presence test: {line}")
