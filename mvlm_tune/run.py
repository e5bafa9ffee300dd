"""A whole tune, as a library call (the CLI and the tests use it): the variants and their fidelity, the search on the
device, the recommendation, the result as a dict (the JSON `mvlm tune --json` prints)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from mvlm_core.errors import MvlmError
from mvlm_tune import space
from mvlm_tune.frontier import Point, noise, recommend
from mvlm_tune.search import Progress, search

PROTOCOLS = ("lm", "vlm", "imp")


@dataclasses.dataclass
class TuneOptions:
    model: Path
    device: str = "local"
    mmproj: Path | None = None
    protocol: str | None = None  # None: vlm with an mmproj, else lm
    budget: space.Budget = dataclasses.field(default_factory=lambda: space.parse_budget(space.DEFAULT_BUDGET))
    lm_types: list[str] = dataclasses.field(default_factory=lambda: ["Q4_0", "Q8_0"])
    mmproj_types: list[str] | None = None
    threads: list[int | None] = dataclasses.field(default_factory=lambda: [None])
    flash_attn: list[int | None] = dataclasses.field(default_factory=lambda: [None])
    objective: str = "total"
    repeat: int = 5
    time_limit: float | None = None
    n_predict: int | None = None
    image: Path | None = None
    allow_requantize: bool = False
    cpu_variant: str | None = None
    save: bool = True
    db: str | None = None
    seed: int = 0
    session: str = ""
    fresh: bool = False  # measure again, not reading back an earlier tune's runs


def resolve_inputs(o: TuneOptions, log: Callable[[str], None]) -> TuneOptions:
    """A checkpoint directory becomes its f16 GGUFs (converted once, cached); the protocol defaults to vlm when
    there is an mmproj, else lm."""
    from mvlm_tune.variants import from_checkpoint

    if Path(o.model).is_dir():
        if o.mmproj is not None:
            raise MvlmError("--mmproj is for a GGUF input: a checkpoint directory brings its own vision tower")
        lm, mm = from_checkpoint(Path(o.model), log)
        protocol = o.protocol or ("vlm" if mm else "lm")
        o = dataclasses.replace(o, model=lm, mmproj=mm if protocol != "lm" else None, protocol=protocol)
        if o.mmproj is not None and o.mmproj_types is None:
            from mvlm_core.filetypes import MMPROJ_TYPES

            o = dataclasses.replace(o, mmproj_types=space.parse_types(space.DEFAULT_MMPROJ_TYPES, MMPROJ_TYPES,
                                                                      "--mmproj-types"))
    return dataclasses.replace(o, protocol=o.protocol or ("vlm" if o.mmproj else "lm"),
                               mmproj_types=o.mmproj_types if o.mmproj is not None else None)


def check(o: TuneOptions) -> None:
    if o.protocol not in PROTOCOLS:
        raise MvlmError(f"--protocol {o.protocol!r}: mvlm tune measures lm, vlm or imp")
    if o.protocol in ("vlm", "imp") and o.mmproj is None:
        raise MvlmError(f"the {o.protocol} protocol needs --mmproj FILE (the mmproj GGUF)")
    if o.protocol == "lm" and o.mmproj is not None:
        raise MvlmError("--mmproj is for the vlm and imp protocols: drop it, or pass --protocol vlm")
    if o.objective == "ve" and o.protocol == "lm":
        raise MvlmError("--objective ve needs an image: use the vlm or imp protocol")
    from mvlm_bench.plan.protocols import MAX_N

    if o.n_predict is not None and not 1 <= o.n_predict <= MAX_N[o.protocol]:
        raise MvlmError(f"--n-predict {o.n_predict} is out of range: give 1 to {MAX_N[o.protocol]} output tokens")
    if o.mmproj is not None and _stem(o.model) == _stem(o.mmproj):
        raise MvlmError(f"the model and --mmproj have the same name ({Path(o.model).name}, {Path(o.mmproj).name}): "
                        "their variants would overwrite each other; name the mmproj as llama.cpp does, "
                        f"mmproj-{Path(o.model).name}")
    from mvlm_core.gguf_header import check_gguf

    check_gguf(o.model, "the model", "lm")
    if o.mmproj is not None:
        check_gguf(o.mmproj, "--mmproj", "mmproj")
    _check_quantizable(o)
    if o.image is not None:
        from mvlm_core.images import check_image_file

        check_image_file(o.image)


def _stem(path: Path) -> str:
    from mvlm_core.filetypes import split_label

    name = Path(path).name
    return split_label(name[:-5] if name.endswith(".gguf") else name)[0]


def _check_quantizable(o: TuneOptions) -> None:
    """An input that is already quantized is refused before anything is made (the LM: unless --allow-requantize;
    the mmproj: gguf-py's quantizers take f16/f32 tensors only), when a type other than the input is asked for."""
    from mvlm_convert.quantize import read_header
    from mvlm_core.filetypes import UNQUANTIZED_FILE_TYPES

    for path, types, kind in ((o.model, o.lm_types, "lm"), (o.mmproj, o.mmproj_types or [], "mmproj")):
        if path is None or all(t == space.INPUT for t in types):
            continue
        _, ftype, _, quantized = read_header(path)
        if not quantized and (ftype is None or ftype in UNQUANTIZED_FILE_TYPES):
            continue
        if kind == "mmproj":
            raise MvlmError(f"--mmproj {path.name} is already quantized: give the f16/f32 mmproj, or --mmproj-types "
                            "input to keep it as it is")
        if not o.allow_requantize:
            raise MvlmError(f"{path.name} is already quantized: tune from the f16/f32 file, or pass "
                            "--allow-requantize (fidelity is then measured against this quantized file)")


def _build_identity(profile) -> str:
    """The runtime's identity for the measurement cache: the pinned llama.cpp commit and the patches' hashes."""
    from mvlm_core import runtime as rtmod

    patches = ",".join(p.sha256[:12] for p in rtmod.project_patches())
    try:
        commit = rtmod.find(profile.target, cpu_variant=getattr(profile, "cpu_variant", None)).manifest.get("commit", "")
    except MvlmError:
        commit = ""
    return f"{commit}:{patches}"


def round_line(p: Progress, labels: tuple[str, str | None]) -> str:
    """One line after each round: what is left, what it cost, the frontier so far."""
    def name(pt: Point) -> str:
        return pt.candidate.label(labels[0], labels[1] or "input")

    def some(pts: list[Point], fmt) -> str:
        return ", ".join(fmt(pt) for pt in pts[:6]) + (f" and {len(pts) - 6} more" if len(pts) > 6 else "")

    front = some(p.front, lambda pt: f"{name(pt)} {pt.median:.3f} s")
    left = f"{len(p.left)} candidate{'' if len(p.left) == 1 else 's'} left"
    return (f"round {p.round}: {p.runs} run{'' if p.runs == 1 else 's'} in {p.seconds / 60:.1f} min; {left}"
            f"{': ' + some(p.left, name) if p.left else ''}; frontier: {front}; noise {100 * p.noise:.1f}%")


NOISY = 0.20  # beyond this spread between runs of one candidate, the ranking is said to be unreliable


def run_tune(o: TuneOptions, log: Callable[[str], None] = lambda s: None,
             on_round: Callable[[Progress], None] | None = None,
             on_step: Callable | None = None) -> tuple[dict, tuple | None]:
    """The tune (module docstring): (the result dict, (LM path, mmproj path, Candidate) of the pick or None).
    ``log``: lines (the bench's own, and one per round); ``on_round``: each round's Progress; ``on_step(step, point)``:
    the run about to start."""
    from mvlm_bench.device.cpu_features import with_cpu_variant
    from mvlm_bench.device.profiles import load_profile
    from mvlm_bench.sinks.files import session_id
    from mvlm_tune import variants

    o = resolve_inputs(o, log)
    check(o)
    profile = with_cpu_variant(load_profile(o.device), o.cpu_variant)
    o = dataclasses.replace(o, session=o.session or session_id(), budget=_applicable_budget(o, log))
    if o.repeat < 3:
        log(f"--repeat {o.repeat}: with fewer than 3 runs each, no two candidates can be told apart (the smallest p "
            f"of {o.repeat} vs {o.repeat} runs is {1 / math.comb(2 * o.repeat, o.repeat):.3g} > 0.05): every "
            "comparison will be a tie")
    v = variants.prepare(o.model, o.mmproj, o.lm_types, o.mmproj_types, o.allow_requantize, o.image, on_step=log)
    cands = space.grid(o.lm_types, o.mmproj_types, o.threads, o.flash_attn)
    points = []
    for c in cands:
        fid = v.candidate_fidelity(c.lm, c.mmproj)
        points.append(Point(c, fid, in_budget=o.budget.allows(fid)))
    return _measure_and_answer(o, profile, v, cands, points, log, on_round, on_step)


def _applicable_budget(o: TuneOptions, log: Callable[[str], None]) -> space.Budget:
    """The budget without limits on figures this tune does not measure (image_cos without an mmproj), said once."""
    kept = tuple((k, v) for k, v in o.budget.limits if k != "image_cos" or o.mmproj is not None)
    if kept != o.budget.limits:
        log(f"the budget's image_cos limit does not apply to the {o.protocol} protocol (no mmproj): left out")
    return space.Budget(kept)


def _measure_and_answer(o: TuneOptions, profile, v, cands, points: list[Point], log, on_round, on_step):
    """The search on the device, its runs kept in the history and the cache; the result dict and the pick's files."""
    from mvlm_bench.history.entries import project_commit
    from mvlm_bench.sinks.base import Sinks
    from mvlm_bench.sinks.history_sink import HistorySink
    from mvlm_core.stops import Stopped, installed
    from mvlm_tune import report
    from mvlm_tune.measure import DeviceRounds, Setup

    stops = installed()
    history = HistorySink(o.db, f"tune-{o.session}", project_commit()) if o.save else None
    sinks = Sinks([history] if history else [], stops)
    rounds = DeviceRounds(Setup(profile, o.protocol, v, o.objective, o.n_predict, o.image), sinks.emit, log,
                          _build_identity(profile), on_step, stops.held if stops is not None else None)
    labels = (v.lm_label, v.mmproj_label)

    def after_round(p: Progress) -> None:
        log(round_line(p, labels))
        if on_round is not None:
            on_round(p)

    cached = 0 if o.fresh else rounds.load_cached(points, o.repeat)
    if cached:
        log(f"{cached} runs of these candidates on {profile.name} read back from an earlier tune ({v.dir}; measured "
            "then, not interleaved with today's: --fresh measures everything again)")
    before = sum(len(p.samples) for p in points)
    try:
        outcome = search(points, rounds, o.repeat, o.time_limit, o.seed, after_round)
    except Stopped:
        made = sum(len(p.samples) for p in points) - before
        where = f"the history (label tune-{o.session}) and " if history is not None and history.ids else ""
        log(f"stopped: the {made} runs finished are kept in {where}the tune cache ({v.dir}); the same command goes "
            "on from them")
        raise
    finally:
        sinks.close()
    level = noise(points)
    if level > NOISY:
        log(f"the runs of one candidate vary by {100 * level:.0f}% (median spread): the device is busy, throttling or "
            "shared, and the ranking is unreliable; measure on a quiet device, with --fresh")
    rec = recommend(points, level, outcome.dropped)
    if history is not None and history.ids:
        log(f"history: {history.message()} (label tune-{o.session})")
    data = report.as_json(points, rec, outcome, o.budget, o.objective, profile.name, o.protocol, labels,
                          len(cands) * (o.repeat + 1), o.session, cached)
    data["search"]["warmups"] = rounds.warmups
    pick = None
    if rec.pick is not None:
        lm, mm = v.candidate_files(rec.pick.candidate.lm, rec.pick.candidate.mmproj)
        pick = (lm, mm, rec.pick.candidate)
    return data, pick
