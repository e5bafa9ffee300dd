"""LLaMA (arch ``llama``) for MobileVLM / MobileLLaMA, LLaVA-1.5 and Xmodel-VLM: what differs from ``lm.base``.

Q and K are permuted the way llama.cpp's own LLaMA converter does (HF stores rotary halves, GGML's rope expects
interleaved pairs), with ``num_key_value_heads`` for K; vocabulary from the SentencePiece ``tokenizer.model`` with
MobileVLM's conv "v1" chat template.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import Dim, check_shape
from mvlm_convert.gguf_stream import PreparedGGUF
from mvlm_convert.lm.base import LmArch, LmHparams, add_sentencepiece_vocab, sentencepiece_dir

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout (two halves per head) -> GGML layout (interleaved pairs); same as llama.cpp's converter."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Llama(LmArch):
    arch: ClassVar[gguf.MODEL_ARCH] = gguf.MODEL_ARCH.LLAMA
    label = "LLaMA"
    layout = "plain LLaMA checkpoint"

    def required(self, hp: LmHparams) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if hp.tied else ["lm_head.weight"])
        for i in range(hp.n_layer):
            p = f"model.layers.{i}."
            names += [f"{p}{x}.weight" for x in ("input_layernorm", "post_attention_layernorm", *PROJ)]
        return names

    def check_layers(self, ckpt: Checkpoint, hp: LmHparams) -> None:
        hd = hp.head_dim
        hid, ffn = Dim(hp.hidden_size, "hidden_size"), Dim(hp.ffn, "intermediate_size")
        q_rows = Dim(hp.n_head * hd, "num_attention_heads", hd, f"{hd}-wide heads")
        kv_rows = self.kv_rows(hp)
        check_shape(ckpt, "model.norm.weight", (hid,))
        for i in range(hp.n_layer):
            p = f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                check_shape(ckpt, f"{p}{norm}.weight", (hid,))
            check_shape(ckpt, p + "self_attn.q_proj.weight", (q_rows, hid))
            check_shape(ckpt, p + "self_attn.k_proj.weight", (kv_rows, hid))
            check_shape(ckpt, p + "self_attn.v_proj.weight", (kv_rows, hid))
            check_shape(ckpt, p + "self_attn.o_proj.weight", (hid, Dim(hp.n_head * hd, "hidden_size")))
            check_shape(ckpt, p + "mlp.gate_proj.weight", (ffn, hid))
            check_shape(ckpt, p + "mlp.up_proj.weight", (ffn, hid))
            check_shape(ckpt, p + "mlp.down_proj.weight", (hid, ffn))

    def produce(self, ckpt: Checkpoint, hf: str, hp: LmHparams) -> Callable[[], torch.Tensor]:
        if hf.endswith("self_attn.q_proj.weight"):
            return lambda: permute_qk(ckpt.get(hf), hp.n_head)
        if hf.endswith("self_attn.k_proj.weight"):
            return lambda: permute_qk(ckpt.get(hf), hp.n_head_kv)
        return super().produce(ckpt, hf, hp)

    def add_vocab(self, w: gguf.GGUFWriter, ckpt: Checkpoint, hp: LmHparams) -> dict[str, object]:
        return add_sentencepiece_vocab(w, sentencepiece_dir(ckpt, "MobileVLM/MobileLLaMA releases"), hp.vocab_size)


LLAMA = Llama()


def prepare_lm_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    return LLAMA.prepare(ckpt, outtype, name)
