"""A record: one repetition (:class:`Run`) and what was measured where (:class:`RunContext`: the device, the files,
the build, the protocol and every setting of the configuration in ``params``). A runner emits one the moment its
repetition ends; sinks receive it as it comes (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from mvlm_bench.records.timings import TimingRecord


@dataclass
class RunContext:
    """What was measured where: everything a reader needs to reproduce or compare a row.

    ``params`` holds the run's parameters (n_threads, n_predict, n_gpu_layers, prompt, image, ...); keys that are
    llama-bench field names appear under those names in the JSON rendering.
    """

    device: str = ""
    model: str = ""
    precision: str = ""
    model_file: str = ""
    model_sha256: str = ""
    mmproj_file: str = ""
    mmproj_sha256: str = ""
    size_bytes: int | None = None  # LM file, plus the mmproj for a VLM (the papers' "Size")
    runtime_commit: str = ""
    runtime_patches: tuple[str, ...] | list[str] = ()
    protocol: str = ""
    cpu_info: str = ""
    gpu_info: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Identity of a group: two runs with equal keys are repetitions of one measurement."""
        d = dataclasses.asdict(self)
        d["runtime_patches"] = list(self.runtime_patches)
        return json.dumps(d, sort_keys=True, default=str)

    def label(self) -> str:
        return self.model or (self.model_file.rsplit("/", 1)[-1] if self.model_file else "?")


@dataclass
class Run:
    """One repetition: the parsed timings, where they came from, and (optionally) how many tokens were generated."""

    timing: TimingRecord
    context: RunContext = field(default_factory=RunContext)
    tokens_out: int | None = None
    wall_s: float | None = None  # process start to exit, measured by the runner: the paper's Total
    # unix time the repetition ended: a Run is made right after its process exited (bench.py), so the default is it
    ended_at: float = field(default_factory=time.time)
    # unix time the repetition's process was started (bench.py; None for runs parsed from saved logs)
    started_at: float | None = None
    # the llama.cpp process's peak resident memory (VmHWM, MB = 1e6 bytes) and the device's temperature (max over its
    # thermal zones, °C) right before and right after the run; None where the device cannot say (resources.py, thermal.py)
    peak_rss_mb: float | None = None
    temp_start_c: float | None = None
    temp_end_c: float | None = None
    # llama-bench fields this run states about itself (timings.run_facts), the device and build (bench.py) and the
    # GGUF (model_size, model_n_params): the JSON report's llama-bench columns (report.LLAMA_BENCH_FIELDS)
    facts: dict[str, Any] = field(default_factory=dict)
    # a protocol's own per-run metrics (the dataset protocol: n_samples, samples_tps, p50_s, ...; DATASET_KEYS)
    extra: dict[str, float | int | None] = field(default_factory=dict)
    # the dataset protocol: one record per sample of the set (question_id, latency_s, prompt_n, predicted_n, ...)
    per_sample: list[dict[str, Any]] = field(default_factory=list)

