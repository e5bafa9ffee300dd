"""Elementary tensor operations the projector forwards share (float32 or float64, PyTorch), written out so that
their conventions are explicit and unit-testable: exact GELU, MobileNet's rounding and hard activations, a channel
LayerNorm, a Linear.
"""

from __future__ import annotations

import math

import torch


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """MobileNet channel rounding: nearest multiple of ``divisor``, never more than 10% below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x) (PyTorch ``nn.GELU()`` default; ggml uses the tanh approximation)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6, as MobileNetV3 defines it (not the 0.2x + 0.5 Keras variant)."""
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * hardsigmoid(x)


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channel axis of an NCHW map (timm LayerNorm2d semantics), biased variance."""
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.t()
    return y + b if b is not None else y
