"""GGUF file types, once: one table of labels, llama.cpp file types and nominal sizes, and the ``-<LABEL>.gguf`` names.

A file type has a lower-case *name* (``q4_k_s``: what ``--outtype`` / ``--type`` take and what a bench report calls
the precision) and an upper-case *label* (``Q4_K_S``: llama.cpp's file-name suffix and ``llama-quantize``'s type
name). ``mvlm convert`` writes the types in :data:`OUTTYPES`; ``mvlm quantize`` writes :data:`LM_TYPES` (through
``llama-quantize``) and :data:`MMPROJ_TYPES` (gguf-py's reference quantizers); ``mvlm bench`` reads the precision
back from a file name (:func:`precision_from_filename`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

QT = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class FileType:
    """One file type: its label, the ``general.file_type`` llama.cpp writes for it, and its nominal bits per weight."""

    label: str  # "Q4_K_S": file names, llama-quantize's type name
    file_type: FT  # general.file_type (llama_ftype)
    bits_per_weight: float  # nominal, for size estimates

    @property
    def name(self) -> str:
        """``q4_k_s``: what the options take and what reports call the precision."""
        return self.label.lower()


# The table, in llama-quantize's order.
TABLE: tuple[FileType, ...] = (
    FileType("Q4_0", FT.MOSTLY_Q4_0, 4.5),
    FileType("Q4_1", FT.MOSTLY_Q4_1, 5.0),
    FileType("Q5_0", FT.MOSTLY_Q5_0, 5.5),
    FileType("Q5_1", FT.MOSTLY_Q5_1, 6.0),
    FileType("Q8_0", FT.MOSTLY_Q8_0, 8.5),
    FileType("Q2_K", FT.MOSTLY_Q2_K, 2.63),
    FileType("Q3_K_S", FT.MOSTLY_Q3_K_S, 3.5),
    FileType("Q3_K_M", FT.MOSTLY_Q3_K_M, 3.9),
    FileType("Q3_K_L", FT.MOSTLY_Q3_K_L, 4.3),
    FileType("Q4_K_S", FT.MOSTLY_Q4_K_S, 4.6),
    FileType("Q4_K_M", FT.MOSTLY_Q4_K_M, 4.9),
    FileType("Q5_K_S", FT.MOSTLY_Q5_K_S, 5.5),
    FileType("Q5_K_M", FT.MOSTLY_Q5_K_M, 5.7),
    FileType("Q6_K", FT.MOSTLY_Q6_K, 6.6),
    FileType("IQ4_NL", FT.MOSTLY_IQ4_NL, 4.5),
    FileType("IQ4_XS", FT.MOSTLY_IQ4_XS, 4.3),
    FileType("F16", FT.MOSTLY_F16, 16.0),
    FileType("BF16", FT.MOSTLY_BF16, 16.0),
    FileType("F32", FT.ALL_F32, 32.0),
)
BY_LABEL: dict[str, FileType] = {t.label: t for t in TABLE}

# --- mvlm convert ---------------------------------------------------------------------------------------------------
_CONVERT = ("F32", "F16", "BF16", "Q8_0")  # --outtype, in the order messages list them
# outtype -> tensor type of the matrices (1-D tensors stay F32; see gguf_stream.matrix_type)
OUTTYPES: dict[str, QT] = {label.lower(): QT[label] for label in _CONVERT}
# outtype -> general.file_type written into the GGUF
FILE_TYPES: dict[str, FT] = {label.lower(): BY_LABEL[label].file_type for label in _CONVERT}
# outtype -> the label in the output file names (``<Name>-F16.gguf``)
FTYPE_LABELS: dict[str, str] = {label.lower(): label for label in _CONVERT}

# --- mvlm quantize --------------------------------------------------------------------------------------------------
# language models (llama-quantize): every type of the table -> nominal bits per weight
LM_TYPES: dict[str, float] = {t.label: t.bits_per_weight for t in TABLE}
# mmproj files (arch ``clip``; gguf-py's reference quantizers), best first
MMPROJ_TYPES: dict[str, float] = {label: BY_LABEL[label].bits_per_weight
                                  for label in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16")}
# general.file_type values of files that are not quantized
UNQUANTIZED_FILE_TYPES: frozenset[int] = frozenset(int(BY_LABEL[label].file_type) for label in ("F32", "F16", "BF16"))

# --- file names: mvlm_core.filenames (no gguf-py needed), here too for the callers of this module ------------------
from mvlm_core.filenames import LABEL_PATTERN, precision_from_filename, split_label  # noqa: E402, F401
