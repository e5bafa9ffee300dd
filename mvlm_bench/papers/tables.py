"""The four seed papers' published latency tables, as data: every row, with the numbers exactly as printed.

Papers (keys of :data:`PAPERS`):

- ``mobilevlm``: Chu et al., "MobileVLM: A Fast, Strong and Open Vision Language Assistant for Mobile Devices"
  (arXiv 2312.16886), Table 5 (language models, p. 8) and Table 6 (VLMs, p. 9): Snapdragon 888 (Realme GT) and
  Jetson AGX Orin, llama.cpp, Sample / Eval_prompt / Eval in tokens/s, Total in s (loading included).
- ``mobilevlm-v2``: Chu et al., "MobileVLM V2: Faster and Stronger Baseline for Vision Language Model", Table 5:
  Jetson Orin, 4-bit, Eval_avg (tokens/s) and T_total (s).
- ``imp``: Shao et al., "Imp: Highly Capable Large Multimodal Models for Mobile Devices", Table 4: T_VE (s),
  S_prompt / S_gen (tokens/s), T_total (s) on RTX 3090, Snapdragon 8Gen3 and 888, 16/8/4-bit.
- ``xmodel``: Xu et al., "Xmodel-VLM: A Simple Baseline for Multimodal Vision Language Model", Table 6: "Samples"
  (token/s) and "Total" (s) for the whole ScienceQA-IMG test set on one RTX 3090.

Each value is kept as the text the paper prints (``PaperMetric.printed``, e.g. ``"63.33"``); ``value`` is that
number and ``half_ulp`` half a unit of its last printed digit, so :func:`check_row` can test the paper's own formula
with interval arithmetic (a value printed ``63.33`` lies in [63.325, 63.335]). Pages are the PDF page numbers where
the source text marks them (MobileVLM); the other papers' texts carry no page markers (``page`` None).

Where a paper's own formula shows that a row cannot be right, the row keeps the printed numbers and says so in
``inconsistent`` (a sentence with the arithmetic); nothing is "fixed". ``tests/test_paper_report.py`` checks that
the rows flagged are exactly the rows :func:`check_row` finds inconsistent.

Metric keys are the history's metric names of the protocol that fills the user's side (``mvlm report --paper``):
``lm`` / ``vlm`` (sample_tps, prompt_tps, eval_tps, total_s, ve_ms_per_patch, eval_avg; ``mvlm_bench.records``),
``imp`` (t_ve_s, s_prompt_tps, s_gen_tps, t_total_s) and ``dataset`` (samples_tps, total_s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAPERS: dict[str, str] = {
    "mobilevlm": "MobileVLM: A Fast, Strong and Open Vision Language Assistant for Mobile Devices (Chu et al., 2023)",
    "mobilevlm-v2": "MobileVLM V2: Faster and Stronger Baseline for Vision Language Model (Chu et al., 2024)",
    "imp": "Imp: Highly Capable Large Multimodal Models for Mobile Devices (Shao et al., 2024)",
    "xmodel": "Xmodel-VLM: A Simple Baseline for Multimodal Vision Language Model (Xu et al., 2024)",
}


@dataclass(frozen=True)
class Column:
    """One metric column of a paper table: history key, the paper's name and unit as printed."""

    key: str
    name: str
    unit: str


@dataclass(frozen=True)
class PaperMetric:
    key: str
    name: str
    unit: str
    printed: str  # the cell exactly as the paper prints it

    @property
    def value(self) -> float | None:
        """The printed number; None when the cell is not a number (Xmodel-VLM prints parameter counts as Size)."""
        try:
            return float(self.printed)
        except ValueError:
            return None

    @property
    def half_ulp(self) -> float:
        """Half a unit of the last printed digit: the rounding the printed value may hide."""
        decimals = len(self.printed.split(".", 1)[1]) if "." in self.printed else 0
        return 0.5 * 10.0**-decimals


@dataclass(frozen=True)
class PaperRow:
    """One published row: where it is printed, what was measured, and its metrics with the paper's units."""

    paper: str
    table: str  # "Table 5"
    page: int | None
    model: str
    quantization: str  # as the paper prints it: "4-bit", "8-bit", "16-bit"
    device: str
    metrics: tuple[PaperMetric, ...]
    lm: str = ""  # the language model inside a VLM (MobileVLM Table 6 prints it in its own column)
    quant_type: str = ""  # the llama.cpp type the paper names for that quantization ("" when it names none)
    tks_out: int | None = None  # output tokens, where the paper gives a row its own count
    note: str = ""
    inconsistent: str = ""  # why the paper's own formula rules this row out ("" when it does not)

    def metric(self, key: str) -> PaperMetric | None:
        return next((m for m in self.metrics if m.key == key), None)

    def value(self, key: str) -> float | None:
        m = self.metric(key)
        return None if m is None else m.value

    @property
    def where(self) -> str:
        """'MobileVLM Table 5, p. 8': the label a report puts on the paper's rows."""
        return f"{PAPER_SHORT[self.paper]} {self.table}" + (f", p. {self.page}" if self.page else "")


@dataclass(frozen=True)
class PaperTable:
    paper: str
    table: str
    page: int | None
    caption: str  # the paper's caption, abridged
    protocol: str  # the `mvlm bench --protocol` whose stored entries fill the user's side
    columns: tuple[Column, ...]
    setting: str  # what was measured: prompt, tokens, devices, runtime
    notes: tuple[str, ...] = ()
    rows: tuple[PaperRow, ...] = field(default=())
    constants: tuple[tuple[str, Any], ...] = ()  # the workload the paper states (for check_row)

    def const(self, name: str, default: Any = None) -> Any:
        return dict(self.constants).get(name, default)

    @property
    def where(self) -> str:
        return f"{PAPER_SHORT[self.paper]} {self.table}" + (f", p. {self.page}" if self.page else "")


PAPER_SHORT = {"mobilevlm": "MobileVLM", "mobilevlm-v2": "MobileVLM V2", "imp": "Imp", "xmodel": "Xmodel-VLM"}


def _table(paper: str, table: str, page: int | None, caption: str, protocol: str, columns: tuple[Column, ...],
           setting: str, rows: list[tuple], notes: tuple[str, ...] = (), constants: tuple = ()) -> PaperTable:
    """Build a table from compact row tuples: (model, lm, device, quantization, quant_type, printed cells..., extras)
    where extras is a dict of PaperRow fields (tks_out, note, inconsistent)."""
    out = []
    for r in rows:
        model, lm, device, quant, qtype, *cells = r
        extra = cells.pop() if cells and isinstance(cells[-1], dict) else {}
        if len(cells) != len(columns):
            raise ValueError(f"{paper} {table} row {model} {device} {quant}: {len(cells)} cells for {len(columns)} columns")
        metrics = tuple(PaperMetric(c.key, c.name, c.unit, str(v)) for c, v in zip(columns, cells, strict=True))
        out.append(PaperRow(paper=paper, table=table, page=page, model=model, quantization=quant, device=device,
                            metrics=metrics, lm=lm, quant_type=qtype, **extra))
    return PaperTable(paper, table, page, caption, protocol, columns, setting, notes, tuple(out), constants)


SIZE = Column("size_gb", "Size", "GB")
SAMPLE = Column("sample_tps", "Sample", "tokens/s")
EVAL_PROMPT = Column("prompt_tps", "Eval_prompt", "tokens/s")
EVAL = Column("eval_tps", "Eval", "tokens/s")
TOTAL = Column("total_s", "Total", "s")

SD888 = "Snapdragon 888"
ORIN = "Jetson Orin"
SD8G3 = "Snapdragon 8Gen3"
RTX3090 = "RTX 3090"

# MobileVLM Table 5 (p. 8): the row order and cells as printed; the model name is printed once per pair of rows.
_MVLM_T5 = [
    ("OpenLLaMA 3B", "", SD888, "8-bit", "q8_0", "3.4", "3093", "7.32", "6.58", "63.33"),
    ("OpenLLaMA 3B", "", SD888, "4-bit", "q4_k_s", "2.3", "3604", "8.97", "7.14", "58.04"),
    ("MobileLLaMA 2.7B", "", SD888, "8-bit", "q8_0", "2.7", "3919", "17.59", "9.14", "44.85"),
    ("MobileLLaMA 2.7B", "", SD888, "4-bit", "q4_k_s", "1.5", "3932", "18.10", "14.71", "28.30"),
    ("TinyLLaMA 1.1B", "", SD888, "8-bit", "q8_0", "1.1", "4215", "39.49", "19.75", "20.83"),
    ("TinyLLaMA 1.1B", "", SD888, "4-bit", "q4_k_s", "0.6", "3887", "44.17", "31.54", "13.22"),
    ("MobileLLaMA 1.4B", "", SD888, "8-bit", "q8_0", "1.4", "3846", "35.46", "17.93", "22.81"),
    ("MobileLLaMA 1.4B", "", SD888, "4-bit", "q4_k_s", "0.7", "3870", "36.20", "28.32", "14.76"),
    ("OpenLLaMA 3B", "", ORIN, "8-bit", "q8_0", "3.4", "2382", "80.34", "29.97", "13.94"),
    ("OpenLLaMA 3B", "", ORIN, "4-bit", "q4_k_s", "2.3", "3340", "143.25", "32.16", "12.83"),
    ("MobileLLaMA 2.7B", "", ORIN, "8-bit", "q8_0", "2.7", "3040", "133.41", "33.28", "12.46"),
    ("MobileLLaMA 2.7B", "", ORIN, "4-bit", "q4_k_s", "1.5", "2647", "130.97", "38.99", "10.74"),
    ("TinyLLaMA 1.1B", "", ORIN, "8-bit", "q8_0", "1.1", "3007", "279.61", "72.30", "5.89"),
    ("TinyLLaMA 1.1B", "", ORIN, "4-bit", "q4_k_s", "0.6", "3801", "306.76", "78.83", "5.38"),
    ("MobileLLaMA 1.4B", "", ORIN, "8-bit", "q8_0", "1.4", "3289", "249.56", "60.73", "6.96"),
    ("MobileLLaMA 1.4B", "", ORIN, "4-bit", "q4_k_s", "0.7", "3738", "253.22", "66.79", "6.33"),
]

_T6_FLAG = {"inconsistent": "576 visual tokens at the printed Eval_prompt plus 256 output tokens at the printed Eval "
                            "take longer than the printed Total (Eq. 4)"}

# MobileVLM Table 6 (p. 9). The table prints "Snapdragon" (Section 4.5: a Snapdragon 888 in a Realme GT).
_MVLM_T6 = [
    ("LLaVA-v1.5-336", "Vicuna 7B", SD888, "4-bit", "", "4.70", "8.23", "17347", "5.36", "0.25", "329.89",
     {"tks_out": 51, "note": "generates 51 output tokens (Table 6 caption)"}),
    ("LLaVA-v1.5-336", "OpenLLaMA 3B", SD888, "4-bit", "", "2.88", "7.98", "27530", "8.95", "7.22", "84.43",
     _T6_FLAG),
    ("LLaVA-v1.5-336", "TinyLLaMA 1B", SD888, "4-bit", "", "1.18", "7.77", "31370", "41.70", "18.40", "20.70",
     _T6_FLAG),
    ("MobileVLM-336", "MobileLLaMA 2.7B", SD888, "4-bit", "", "2.14", "8.43", "27660", "18.36", "12.21", "33.10"),
    ("MobileVLM-336", "MobileLLaMA 1.4B", SD888, "4-bit", "", "1.40", "6.82", "34892", "34.93", "21.54", "18.51"),
    ("LLaVA-v1.5-336", "Vicuna 7B", ORIN, "4-bit", "", "4.70", "2.89", "9281", "367.26", "17.74", "19.75",
     {"tks_out": 51, "note": "generates 51 output tokens (Table 6 caption)"}),
    ("LLaVA-v1.5-336", "OpenLLaMA 3B", ORIN, "4-bit", "", "2.88", "2.94", "22270", "474.49", "30.66", "12.52"),
    ("LLaVA-v1.5-336", "TinyLLaMA 1B", ORIN, "4-bit", "", "1.18", "2.98", "24655", "1253.94", "76.63", "5.90"),
    ("MobileVLM-336", "MobileLLaMA 2.7B", ORIN, "4-bit", "", "2.14", "3.11", "15678", "440.60", "38.34", "8.31"),
    ("MobileVLM-336", "MobileLLaMA 1.4B", ORIN, "4-bit", "", "1.40", "3.32", "17712", "667.69", "65.27", "5.14"),
]

# MobileVLM V2 Table 5. Eval_avg is defined (Section 4.4) as "dividing the total time by the number of 256 output
# tokens", which read literally is s/token; the unit (tokens/s) and the numbers mean 256 / T_total.
_V2_T5 = [
    ("ShareGPT4V-7B", "", ORIN, "4-bit", "", "70.8", "13.00", "19.69"),
    ("LLaVA-1.5 7B", "", ORIN, "4-bit", "", "68.8", "12.96", "19.75",
     {"note": "T_total 19.75 s equals MobileVLM Table 6's Orin LLaVA-v1.5 (Vicuna 7B) Total, a run that generated 51 "
              "tokens (that table's caption); Eval_avg here divides 256 by it"}),
    ("MobileVLM V2 7B", "", ORIN, "4-bit", "", "72.1", "15.49", "16.53"),
    ("LLaVA-1.5 3.3B", "", ORIN, "4-bit", "", "62.7", "20.45", "12.52"),
    ("MobileVLM 3B", "", ORIN, "4-bit", "", "62.8", "30.80", "8.31"),
    ("MobileVLM V2 3B", "", ORIN, "4-bit", "", "68.1", "30.80", "8.38",
     {"inconsistent": "Eval_avg = 256 / T_total = 256/8.38 = 30.55 tokens/s (30.53-30.57 over T_total's rounding), "
                      "printed 30.80 (the MobileVLM 3B row's value)"}),
    ("LLaVA-1.5 1.4B", "", ORIN, "4-bit", "", "55.7", "43.39", "5.90"),
    ("MobileVLM 1.7B", "", ORIN, "4-bit", "", "58.7", "49.80", "5.14"),
    ("MobileVLM V2 1.7B", "", ORIN, "4-bit", "", "64.2", "51.63", "4.96"),
]

_IMP_FLAG = {"inconsistent": "with N_prompt = 41 + 576 (the image embeddings the text gives MobileVLM-3B@336) and "
                             "N_gen = 64, Eq. (1)'s terms exceed the printed T_total; they fit with 144 image tokens, "
                             "what MobileVLM's LDP projector emits"}

# Imp Table 4: one printed line holds the RTX 3090 / SD 8Gen3 / SD 888 cells of one model and precision; Size is
# printed once per precision. The 16-bit rows exist for the RTX 3090 only.
_IMP_T4 = [
    ("MobileVLM-3B@336", "", RTX3090, "16-bit", "", "5.6", "0.027", "5919.84", "102.57", "0.70",
     _IMP_FLAG),
    ("MobileVLM-3B@336", "", RTX3090, "8-bit", "", "3.3", "0.027", "3937.64", "137.26", "0.57",
     _IMP_FLAG),
    ("MobileVLM-3B@336", "", SD8G3, "8-bit", "", "3.3", "4.93", "17.19", "13.79", "21.10",
     _IMP_FLAG),
    ("MobileVLM-3B@336", "", SD888, "8-bit", "", "3.3", "9.70", "11.18", "6.85", "37.09",
     _IMP_FLAG),
    ("MobileVLM-3B@336", "", RTX3090, "4-bit", "", "2.1", "0.027", "4006.48", "176.17", "0.47",
     _IMP_FLAG),
    ("MobileVLM-3B@336", "", SD8G3, "4-bit", "", "2.1", "4.93", "15.73", "13.07", "22.23",
     _IMP_FLAG),
    ("MobileVLM-3B@336", "", SD888, "4-bit", "", "2.1", "9.63", "10.73", "8.15", "35.85",
     _IMP_FLAG),
    ("Imp-3B@384", "", RTX3090, "16-bit", "", "6.0", "0.045", "6125.18", "97.91", "0.83"),
    ("Imp-3B@384", "", RTX3090, "8-bit", "", "3.6", "0.043", "4731.30", "138.17", "0.68"),
    ("Imp-3B@384", "", SD8G3, "8-bit", "", "3.6", "8.57", "15.73", "11.91", "63.57"),
    ("Imp-3B@384", "", SD888, "8-bit", "", "3.6", "17.52", "10.10", "5.82", "105.80"),
    ("Imp-3B@384", "", RTX3090, "4-bit", "", "2.3", "0.043", "4814.34", "167.17", "0.59"),
    ("Imp-3B@384", "", SD8G3, "4-bit", "", "2.3", "8.88", "14.02", "11.02", "70.12"),
    ("Imp-3B@384", "", SD888, "4-bit", "", "2.3", "16.9", "9.89", "6.74", "105.05"),
    ("Imp-3B@196", "", RTX3090, "16-bit", "", "6.0", "0.018", "6325.2", "101.71", "0.69"),
    ("Imp-3B@196", "", RTX3090, "8-bit", "", "3.6", "0.017", "3744.14", "137.57", "0.57"),
    ("Imp-3B@196", "", SD8G3, "8-bit", "", "3.6", "2.09", "17.12", "13.63", "21.24"),
    ("Imp-3B@196", "", SD888, "8-bit", "", "3.6", "4.02", "11.68", "6.86", "34.65"),
    ("Imp-3B@196", "", RTX3090, "4-bit", "", "2.3", "0.017", "3930.54", "170.42", "0.48"),
    ("Imp-3B@196", "", SD8G3, "4-bit", "", "2.3", "2.10", "15.64", "12.73", "22.72"),
    ("Imp-3B@196", "", SD888, "4-bit", "", "2.3", "4.02", "10.84", "8.31", "34.37"),
]

_XMODEL_T6 = [
    ("LLaVA-7B", "", RTX3090, "not stated", "", "7B", "19.06", "1090.32"),
    ("MobileVLM-1.7B", "", RTX3090, "not stated", "", "1.7B", "919.25", "579.88"),
    ("Xmodel-VLM", "", RTX3090, "not stated", "", "1.1B", "415.69", "1360.25"),
]

TABLES: tuple[PaperTable, ...] = (
    _table(
        "mobilevlm", "Table 5", 8,
        "Latency comparison of small language models on mobile and IoT devices", "lm",
        (SIZE, SAMPLE, EVAL_PROMPT, EVAL, TOTAL),
        "llama.cpp; prompt \"Building a website can be done in 10 simple steps:\\nStep 1:\", 400 output tokens; "
        "Snapdragon 888 (Realme GT, 8 GB) CPU and Jetson AGX Orin (32 GB, CUDA 11.4); 8-bit = q8_0, 4-bit = q4_k_s",
        _MVLM_T5,
        notes=("Size: the quantized model file (GB).",
               "Total: one whole inference, model loading included; "
               "Eq. 4: Total = Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Others."),
        constants=(("tks_out", 400), ("tks_in_min", 0), ("formula", "mobilevlm-eq4")),
    ),
    _table(
        "mobilevlm", "Table 6", 9,
        "Latency comparison of mobile-scale VLMs", "vlm",
        (SIZE, Column("ve_ms_per_patch", "VE", "ms/patch"), SAMPLE, EVAL_PROMPT, EVAL, TOTAL),
        "llama.cpp; 336x336 image + \"What is in the picture?\", 256 output tokens (51 for LLaVA-v1.5 / Vicuna 7B); "
        "LM 4-bit, vision encoder and projector unquantized; 144 visual tokens (MobileVLM), 576 (LLaVA-v1.5)",
        _MVLM_T6,
        notes=("Size: language model + visual encoder (GB).",
               "The table prints the phone as \"Snapdragon\"; Section 4.5 names it: Snapdragon 888.",
               "VE: vision-encoder latency in ms per image patch (14x14 patches of a 336x336 image: 576).",
               "The caption says only \"4-bit\"; Table 5's 4-bit mode is q4_k_s."),
        constants=(("tks_out", 256), ("formula", "mobilevlm-eq4"),
                   ("tks_in_min_by_model", (("LLaVA-v1.5-336", 576), ("MobileVLM-336", 144)))),
    ),
    _table(
        "mobilevlm-v2", "Table 5", None,
        "Latency comparison of mobile-scale VLMs on NVIDIA Jetson Orin", "vlm",
        (Column("avg_accuracy", "Avg. accuracy", ""), Column("eval_avg", "Eval_avg", "tokens/s"),
         Column("total_s", "T_total", "s")),
        "llama.cpp on NVIDIA AGX Jetson Orin, \"identical configurations as MobileVLM\" (its Table 6: 336x336 image "
        "+ \"What is in the picture?\", 256 output tokens), LM 4-bit; custom CUDA kernels for LDPv2",
        _V2_T5,
        notes=("Eval_avg = 256 / T_total (Section 4.4 words it inverted: \"dividing the total time by the number of "
               "256 output tokens\"; the unit tokens/s and the numbers mean tokens over time).",
               "Avg. accuracy: mean of six benchmarks (Table 4), not a latency; no user value."),
        constants=(("tks_out", 256), ("formula", "eval-avg")),
    ),
    _table(
        "imp", "Table 4", None,
        "Latency and performance comparisons of MobileVLM-3B@336, Imp-3B@384 and Imp-3B@196 on different hardware "
        "platforms and quantization precision", "imp",
        (SIZE, Column("t_ve_s", "T_VE", "s"), Column("s_prompt_tps", "S_prompt", "tokens/s"),
         Column("s_gen_tps", "S_gen", "tokens/s"), Column("t_total_s", "T_total", "s")),
        "llama.cpp; the same 41-token text prompt plus the image embeddings (576 MobileVLM-3B@336, 729 Imp-3B@384, "
        "196 Imp-3B@196), response stopped at the 64th token; model loading not counted",
        _IMP_T4,
        notes=("Eq. (1) is printed T_total = T_VE + S_prompt/N_prompt + S_gen/N_gen + T_other, speeds over token "
               "counts; the units (S in tokens/s, T in s) mean N_prompt/S_prompt and N_gen/S_gen. The data here "
               "follows that meaning.",
               "\"repetitively\" in the caption means respectively.",
               "SQA-IMG and MMB accuracies of the table (computed on the RTX 3090) are not latencies and are left out."),
        constants=(("formula", "imp-eq1"), ("n_text", 41), ("n_gen", 64),
                   ("n_image_by_model", (("MobileVLM-3B@336", 576), ("Imp-3B@384", 729), ("Imp-3B@196", 196)))),
    ),
    _table(
        "xmodel", "Table 6", None,
        "Latency comparison of small VLMs", "dataset",
        (Column("size", "Size", "GB"), Column("samples_tps", "Samples", "token/s"), Column("total_s", "Total", "s")),
        "the whole ScienceQA-IMG (SQA^I) test set on one NVIDIA GeForce RTX 3090 (24 GB), preprocessing excluded; "
        "runtime and precision not stated",
        _XMODEL_T6,
        notes=("The Size(GB) column prints parameter counts (7B, 1.7B, 1.1B), not gigabytes; kept as printed.",
               "\"Samples\": tokens predicted per second; \"Total\": time for the whole SQA^I test set. The paper "
               "gives no formula linking them, so no row can be checked; Samples x Total (tokens generated, if "
               "both cover the same work) is 20.8k, 533k and 565k tokens for the three rows."),
        constants=(("formula", None),),
    ),
)


def tables(paper: str) -> tuple[PaperTable, ...]:
    return tuple(t for t in TABLES if t.paper == paper)


def all_rows() -> list[PaperRow]:
    return [r for t in TABLES for r in t.rows]


def table_of(row: PaperRow) -> PaperTable:
    return next(t for t in TABLES if t.paper == row.paper and t.table == row.table)


@dataclass(frozen=True)
class Check:
    """The paper's own formula applied to one row: ``ok`` None where the paper gives none. ``need`` and ``bound``:
    the smallest value the formula allows and the largest the printed value can be (or the interval of Eval_avg)."""

    ok: bool | None
    detail: str


def _lo_time(n: float, m: PaperMetric) -> float:
    """The shortest time n tokens can take at a printed speed (the speed at the top of its rounding interval)."""
    return n / (m.value + m.half_ulp)  # type: ignore[operator]


def check_row(row: PaperRow) -> Check:
    """Is the row possible under its paper's own formula, given the printed rounding?

    - MobileVLM Eq. 4: Total >= Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval (Load, Others >= 0); Tks_in at
      least the visual tokens (Table 6) or 0 (Table 5: the prompt's token count is not printed).
    - MobileVLM V2: Eval_avg = 256 / T_total.
    - Imp Eq. (1), read as N/S: T_total >= T_VE + N_prompt/S_prompt + N_gen/S_gen (T_other >= 0).
    """
    t = table_of(row)
    formula = t.const("formula")
    if formula == "mobilevlm-eq4":
        tks_out = row.tks_out or t.const("tks_out")
        tks_in = dict(t.const("tks_in_min_by_model", ())).get(row.model, t.const("tks_in_min", 0))
        total = row.metric("total_s")
        need = (_lo_time(tks_in, row.metric("prompt_tps")) + _lo_time(tks_out, row.metric("sample_tps"))
                + _lo_time(tks_out, row.metric("eval_tps")))
        hi = total.value + total.half_ulp
        return Check(need <= hi, f"Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval >= {need:.2f} s "
                                 f"(Tks_in >= {tks_in}, Tks_out = {tks_out}); Total <= {hi:.3f} s")
    if formula == "eval-avg":
        total, ev = row.metric("total_s"), row.metric("eval_avg")
        lo = t.const("tks_out") / (total.value + total.half_ulp)
        hi = t.const("tks_out") / (total.value - total.half_ulp)
        ok = lo <= ev.value + ev.half_ulp and ev.value - ev.half_ulp <= hi
        return Check(ok, f"256 / T_total in [{lo:.3f}, {hi:.3f}] tokens/s; Eval_avg printed {ev.printed}")
    if formula == "imp-eq1":
        n_prompt = t.const("n_text") + dict(t.const("n_image_by_model"))[row.model]
        ve, total = row.metric("t_ve_s"), row.metric("t_total_s")
        need = (ve.value - ve.half_ulp + _lo_time(n_prompt, row.metric("s_prompt_tps"))
                + _lo_time(t.const("n_gen"), row.metric("s_gen_tps")))
        hi = total.value + total.half_ulp
        return Check(need <= hi, f"T_VE + N_prompt/S_prompt + N_gen/S_gen >= {need:.3f} s (N_prompt = {n_prompt}, "
                                 f"N_gen = {t.const('n_gen')}); T_total <= {hi:.3f} s")
    return Check(None, "the paper gives no formula linking this table's columns")


def row_record(row: PaperRow) -> dict[str, Any]:
    """A row as JSON: where it is printed, what was measured, each metric's printed text, number and unit."""
    check = check_row(row)
    return {
        "source": "paper", "paper": row.paper, "table": row.table, "page": row.page, "where": row.where,
        "model": row.model, "lm": row.lm or None, "quantization": row.quantization,
        "quant_type": row.quant_type or None, "device": row.device,
        "metrics": {m.key: {"name": m.name, "unit": m.unit, "printed": m.printed, "value": m.value}
                    for m in row.metrics},
        "tks_out": row.tks_out, "note": row.note or None, "inconsistent": row.inconsistent or None,
        "formula_check": {"ok": check.ok, "detail": check.detail},
    }
