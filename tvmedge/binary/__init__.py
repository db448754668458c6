"""Binary neural networks end to end: Larq-style PyTorch layers (:mod:`.layers`), a binarized
digits model (:mod:`.digits_bnn`) and the lowering of binary layers to bit-packed XNOR/popcount
TVM operators inside a Relax module (:mod:`.lower`)."""

from .layers import (ApproxSign, BinaryConv2d, BinaryDense, Quantizer, SignSTE,
                     clip_latent_weights, is_fully_binary)

__all__ = ["ApproxSign", "BinaryConv2d", "BinaryDense", "Quantizer", "SignSTE",
           "clip_latent_weights", "is_fully_binary"]
