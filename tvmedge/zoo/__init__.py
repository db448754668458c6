"""The reference models every test and benchmark uses, exportable to ONNX and ``.pt2``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import TvmedgeError
from . import models


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]
    input_name: str
    output_name: str
    description: str
    trained: bool = False


def _random(cls: type[torch.nn.Module], seed: int, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(seed)
        return models.randomize_bn(cls(**kw), seed).eval()
    return build


def _digits() -> torch.nn.Module:
    from .digits import load_trained
    return load_trained()


def _digits_bnn() -> torch.nn.Module:
    from ..binary.digits_bnn import load_trained
    return load_trained()


def _shapes() -> torch.nn.Module:
    from .shapes import load_trained
    return load_trained()


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("mobilenet_v2", _random(models.MobileNetV2, 1), (1, 3, 224, 224), "input", "logits",
             "MobileNetV2 1.0, ImageNet head, 224x224 (random weights)"),
    ZooEntry("resnet18", _random(models.ResNet18, 2), (1, 3, 224, 224), "input", "logits",
             "ResNet-18, ImageNet head, 224x224 (random weights)"),
    ZooEntry("lraspp_mbv3", _random(models.LRASPPMobileNetV3, 3), (1, 3, 256, 512), "input", "segmap",
             "LR-ASPP on MobileNetV3-Large, 21 classes, 256x512 segmentation (random weights)"),
    ZooEntry("digits-cnn", _digits, (1, 1, 8, 8), "input", "logits",
             "small CNN trained on scikit-learn's 8x8 handwritten digits", trained=True),
    ZooEntry("shapes-seg", _shapes, (1, 3, 64, 64), "input", "segmap",
             "small U-Net trained on generated coloured shapes, 4 classes, 64x64 segmentation", trained=True),
    ZooEntry("digits-bnn", _digits_bnn, (1, 1, 8, 8), "input", "logits",
             "binarized digits CNN (XNOR/popcount middle layers; export .relax to run them on bits)",
             trained=True),
]}


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise TvmedgeError(f"unknown zoo model '{name}' (known: {', '.join(ZOO)})")
    return ZOO[name]


def example_input(entry: ZooEntry, seed: int = 0) -> torch.Tensor:
    return torch.randn(entry.input_shape, generator=torch.Generator().manual_seed(seed))


def export(name: str, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export a zoo model to ONNX (``.onnx``), a ``torch.export`` program (``.pt2``) or
    TFLite (``.tflite``: plain CNNs only, see :mod:`tvmedge.zoo.tflite_export`)."""
    entry = get(name)
    path = Path(path)
    model = entry.build()
    x = example_input(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    if path.suffix == ".onnx":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter needs no onnxscript and gives plain, stable graphs.
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[entry.input_name], output_names=[entry.output_name])
    elif path.suffix == ".pt2":
        ep = torch.export.export(model, (x,))
        torch.export.save(ep, str(tmp))
    elif path.suffix == ".tflite":
        from .tflite_export import export_tflite

        export_tflite(model, tmp, entry.input_shape, entry.input_name, entry.output_name)
    elif path.suffix == ".relax":  # binary networks: XNOR/popcount operators on packed bits
        from ..binary.lower import contains_binary_layers, export_relax

        if not contains_binary_layers(model):
            raise TvmedgeError(f"'.relax' export is for binary networks (e.g. digits-bnn); "
                               f"export {name} to .onnx or .pt2")
        export_relax(model, entry.input_shape, tmp, entry.input_name, entry.output_name, f"zoo:{name}")
    else:
        raise TvmedgeError(f"cannot export to '{path.suffix}': use .onnx, .pt2, .tflite or .relax (binary)")
    os.replace(tmp, path)
    return path
