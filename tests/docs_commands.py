"""The `mvlm` commands written in docs/ and README.md, as a reader copies them.

- ``blocks()``: every fenced code block that holds an ``mvlm`` command line (a line that starts with ``mvlm `` or
  ``$ mvlm ``, continued over trailing backslashes), with the block's mark: a first line ``# needs a phone ...`` /
  ``# needs a board ...`` / ``# needs a GPU ...`` (words ``phone``, ``board``, ``GPU``) for blocks with commands that
  only a phone, a Jetson-class board or a CUDA machine can run. Other commands in a marked block still run here.
- ``inline()``: the ``mvlm ...`` commands quoted inline in the prose (`` `mvlm ...` ``).
- ``needs(argv)``: what a command needs that this machine does not have, read from the command itself (its
  ``--device``, ``--target``, ``--runtime``, ``--ndk``, the devices ``mvlm devices`` is given), never from the mark.
- ``parse(argv)``: click's own parsing of the command against the real ``mvlm`` app (unknown options, missing
  values, bad choices fail), without running it. Synopses (``[--opt X]``, ``a|b``, ``…``) are checked option by
  option instead.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = ("phone", "board", "gpu")
# Profiles the docs themselves define for the reader to write (docs/devices.md: gpu.toml) and what they need.
DOC_PROFILES = {"gpu": "gpu", "gpu.toml": "gpu"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
FENCE = re.compile(r"^[ \t]*```(\S*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`(mvlm(?: [^`]*)?)`")
SYNOPSIS = re.compile(r"[\[\]|…<>]|\.\.\.")


@dataclass
class Command:
    file: str
    line: int
    text: str  # as written (continuations joined), comments included

    @property
    def argv(self) -> list[str]:
        """The words after ``mvlm``, as a shell splits them (comments dropped)."""
        return words(self.text)

    @property
    def synopsis(self) -> bool:
        return bool(SYNOPSIS.search(self.text.split(" #")[0]))

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Block:
    file: str
    line: int
    mark: set[str]
    mark_text: str = ""
    commands: list[Command] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _mark(first_line: str) -> set[str]:
    text = first_line.strip().lower()
    if not text.startswith("# needs"):
        return set()
    return {n for n in NEEDS if n in text} | ({"board"} if "jetson" in text else set())


def _synopsis_tail(line: str) -> bool:
    """An indented ``[--option ...]`` line under a command: the rest of its synopsis."""
    return line[:1].isspace() and line.strip().startswith("[")


def blocks() -> list[Block]:
    found = []
    for path in DOC_FILES:
        doc = path.read_text()
        for m in FENCE.finditer(doc):
            body = m.group(2)
            start = doc[: m.start(2)].count("\n") + 1
            lines = body.splitlines()
            head = lines[0].strip() if lines else ""
            block = Block(_rel(path), start - 1, _mark(head), head if _mark(head) else "")
            i = 0
            while i < len(lines):
                raw = lines[i].strip()
                first = i
                if raw.startswith("$ "):
                    raw = raw[2:]
                if raw.startswith("mvlm ") or raw == "mvlm":
                    text = raw
                    while i + 1 < len(lines) and (text.endswith("\\") or _synopsis_tail(lines[i + 1])):
                        i += 1
                        text = text.removesuffix("\\").rstrip() + " " + lines[i].strip()
                    block.commands.append(Command(_rel(path), start + first, text))
                i += 1
            if block.commands:
                found.append(block)
    return found


def inline() -> list[Command]:
    found = []
    for path in DOC_FILES:
        doc = path.read_text()
        for m in INLINE.finditer(doc):
            text = m.group(1).replace("\\|", "|")
            found.append(Command(_rel(path), doc[: m.start()].count("\n") + 1, text))
    return found


def _builtin_profiles() -> dict[str, dict]:
    return {p.stem: tomllib.loads(p.read_text()) for p in (ROOT / "devices").glob("*.toml")}


def _device_needs(value: str, profiles: dict[str, dict]) -> set[str]:
    if value.startswith("adb:"):
        return {"phone"}
    if value.startswith("ssh://"):
        host = value[6:].split("@")[-1].split(":")[0].split("/")[0]
        return set() if host in LOCAL_HOSTS else {"board"}
    name = Path(value).name
    if value in DOC_PROFILES or name in DOC_PROFILES:
        return {DOC_PROFILES.get(value) or DOC_PROFILES[name]}
    prof = profiles.get(value)
    if prof is None:
        return {"board"}  # a profile file the reader writes for a machine of their own
    return _target_needs(prof.get("target", "host")) | ({"phone"} if prof.get("transport") == "adb" else set()) | (
        {"board"} if prof.get("transport") == "ssh" else set())


def _target_needs(target: str) -> set[str]:
    return {"cuda": {"gpu"}, "orin": {"board"}, "android-arm64": {"phone"}}.get(target, set())


def _option_values(argv: list[str], *names: str) -> list[str]:
    vals = []
    for i, w in enumerate(argv):
        for n in names:
            if w == n and i + 1 < len(argv):
                vals.append(argv[i + 1])
            elif w.startswith(n + "="):
                vals.append(w.split("=", 1)[1])
    return vals


def needs(argv: list[str]) -> set[str]:
    """What the command needs beyond this machine, from the command's own words.

    ``--device D`` needs D: in bench, serve and runtime build to reach it, in history, report and compare for the
    entries measured on it (``mvlm history plot --device orin`` has nothing to plot without them)."""
    profiles = _builtin_profiles()
    out: set[str] = set()
    for dev in _option_values(argv, "--device"):
        out |= _device_needs(dev, profiles)
    for t in _option_values(argv, "--target", "--runtime"):
        out |= _target_needs(t)
    if _option_values(argv, "--ndk"):
        out.add("phone")
    for spec in _option_values(argv, "--against"):
        if "android-arm64" in spec:
            out.add("phone")
    if argv[:1] == ["devices"]:
        for word in argv[1:]:
            if not word.startswith("-"):
                out |= _device_needs(word, profiles)
    return out


def _app():
    import typer.main

    from mvlm.cli import app

    return typer.main.get_command(app)


def parse(argv: list[str]) -> None:
    """Parse ``mvlm ARGV`` with the real app's commands; raises the usage error the command line would print.

    Only parsing: no callback and no command body runs. Values are converted by their declared types (choices,
    numbers)."""
    cmd, ctx, args = _app(), None, list(argv)
    name = "mvlm"
    while True:
        for p in cmd.params:
            p.callback = None  # a callback acts (--version prints and exits); parsing is what is checked here
        ctx = cmd.make_context(name, args, parent=ctx, resilient_parsing=False)
        if not hasattr(cmd, "commands"):
            return
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, cmd, args = cmd.resolve_command(ctx, rest)
        args = list(args)


def words(text: str) -> list[str]:
    """A command's words after ``mvlm`` as a shell splits them, up to a pipe or a ``&&`` (what follows is not mvlm's)."""
    try:
        ws = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose
        ws = text.split()
    cut = next((i for i, w in enumerate(ws) if w in ("|", "&&", ";", "||")), len(ws))
    return ws[1:cut]


def _takes_value(cmd, opt: str) -> bool:
    for p in cmd.params:
        if opt in (*p.opts, *p.secondary_opts):
            return not (getattr(p, "is_flag", False) or getattr(p, "count", False))
    return False


def unknown_words(argv: list[str]) -> list[str]:
    """What a synopsis or an inline mention names that ``mvlm`` does not have: sub-commands and option names.

    A synopsis shows alternatives (``--kv-cache f32|f16``), optional parts (``[--image IMG]``) and elisions (``…``);
    its values are not checked, its words are."""
    cmd, names, bad = _app(), set(), []
    rest = list(argv)
    while rest:
        names |= {n for p in cmd.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")}
        w = rest.pop(0)
        if w.startswith(("-", "[")):
            if _takes_value(cmd, w.lstrip("[").split("=")[0]) and "=" not in w and rest:
                rest.pop(0)
            continue
        if not hasattr(cmd, "commands") or w in ("…", "..."):
            break
        if w not in cmd.commands:
            bad.append(f"no command {w!r}")
            break
        cmd = cmd.commands[w]
    names |= {n for p in cmd.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")} | {"--help"}
    for w in argv:
        for opt in re.split(r"[\[\]|/]", w):
            opt = re.split(r"[=<]", opt)[0]
            if opt.startswith("-") and opt not in ("-", "--") and not re.fullmatch(r"-[0-9.]+", opt) and opt not in names:
                bad.append(f"no option {opt!r}")
    return bad
