"""Binary (1-bit) layers for PyTorch with pluggable quantizers, in the style of Larq.

A quantizer is a tiny module mapping a float tensor to ±1 in the forward pass and choosing a
surrogate gradient for the backward pass:

* :class:`SignSTE` - ``sign`` forward (``sign(0) = +1``, the bit convention of
  :mod:`tvmedge.kernels.pack`), straight-through estimator backward, cancelled where
  ``|x| > clip`` (Hubara et al., 2016);
* :class:`ApproxSign` - ``sign`` forward, the piecewise-polynomial derivative of Bi-Real Net
  (``2 - 2|x|`` on ``|x| <= 1``, else 0) backward.

:class:`BinaryConv2d` and :class:`BinaryDense` are ``nn.Conv2d`` / ``nn.Linear`` whose input and
kernel pass through their quantizers; with ``scale="channel"`` the binarized kernel is multiplied
by XNOR-Net's per-output-channel ``alpha = mean |W|``. A layer without quantizers is a float
layer. Spatial padding pads the *quantized* input with ``pad_value`` (0 as in ``nn.Conv2d``, or
±1 so that every tap is a bit).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignSTEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class _ApproxSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


class Quantizer(nn.Module):
    """Base of the quantizers; ``binary`` tells the compiler the output is ±1 (one bit)."""

    binary: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SignSTE(Quantizer):
    """``sign(x)`` (0 -> +1) with a straight-through gradient, zero where ``|x| > clip``."""

    binary = True

    def __init__(self, clip: float = 1.0) -> None:
        super().__init__()
        self.clip = float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd (inference, ONNX/torch.export) plain ops: exporters cannot see
        # through a Python autograd.Function.
        if torch.is_grad_enabled() and x.requires_grad:
            return _SignSTEFn.apply(x, self.clip)
        return _sign(x)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


class ApproxSign(Quantizer):
    """``sign(x)`` with Bi-Real Net's approximate derivative ``max(0, 2 - 2|x|)``."""

    binary = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _ApproxSignFn.apply(x)
        return _sign(x)


def _check_scale(scale: str | None) -> str | None:
    if scale not in (None, "channel"):
        raise ValueError(f"scale must be None or 'channel', got {scale!r}")
    return scale


class BinaryConv2d(nn.Conv2d):
    """``nn.Conv2d`` on quantized inputs and kernels, with optional per-channel scaling.

    ``padding`` must be an int; padded taps hold ``pad_value`` after quantization.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False,
                 input_quantizer: Quantizer | None = None, kernel_quantizer: Quantizer | None = None,
                 scale: str | None = "channel", pad_value: float = 0.0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        if pad_value not in (0.0, 1.0, -1.0):
            raise ValueError(f"pad_value must be 0, 1 or -1, got {pad_value}")
        self.pad = padding
        self.pad_value = float(pad_value)
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        self.scale = _check_scale(scale)

    def alpha(self) -> torch.Tensor:
        """Per-output-channel scale ``mean |W|`` (shape [O])."""
        return self.weight.abs().mean(dim=(1, 2, 3))

    def effective_weight(self) -> torch.Tensor:
        """The kernel the convolution uses: quantized, times alpha when scaled."""
        w = self.kernel_quantizer(self.weight) if self.kernel_quantizer is not None else self.weight
        if self.scale == "channel":
            w = w * self.alpha().view(-1, 1, 1, 1)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.pad and self.pad_value != 0.0:
            x = F.pad(x, [self.pad] * 4, value=self.pad_value)
            return F.conv2d(x, self.effective_weight(), self.bias, self.stride)
        # zero padding inside the conv: exports to ONNX as a plain Conv (no Pad node)
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.pad)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pad={self.pad}, pad_value={self.pad_value}, "
                f"scale={self.scale}")


class BinaryDense(nn.Linear):
    """``nn.Linear`` on quantized inputs and kernels, with optional per-output scaling."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 input_quantizer: Quantizer | None = None, kernel_quantizer: Quantizer | None = None,
                 scale: str | None = "channel") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        self.scale = _check_scale(scale)

    def alpha(self) -> torch.Tensor:
        """Per-output scale ``mean |W|`` over the inputs (shape [O])."""
        return self.weight.abs().mean(dim=1)

    def effective_weight(self) -> torch.Tensor:
        w = self.kernel_quantizer(self.weight) if self.kernel_quantizer is not None else self.weight
        if self.scale == "channel":
            w = w * self.alpha().view(-1, 1)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.effective_weight(), self.bias)


def is_fully_binary(layer: nn.Module) -> bool:
    """True for a binary layer whose input and kernel are both binarized (runs on bits)."""
    return (isinstance(layer, (BinaryConv2d, BinaryDense))
            and getattr(layer.input_quantizer, "binary", False)
            and getattr(layer.kernel_quantizer, "binary", False))


def clip_latent_weights(model: nn.Module, bound: float = 1.0) -> None:
    """Clamp the float ("latent") kernels of binary layers to [-bound, bound] after a step,
    so that a straight-through gradient cancelled beyond the clip cannot strand them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (BinaryConv2d, BinaryDense)) and m.kernel_quantizer is not None:
                m.weight.clamp_(-bound, bound)
