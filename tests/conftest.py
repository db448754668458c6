"""Shared test fixtures.

``torchvision``: the torchvision 0.28 wheel that matches torch 2.13 is built against CUDA
torch, so its C extension does not load next to the CPU build; its import then fails while
registering fake kernels for ``torchvision::nms``/``qnms``, operators the extension would
have defined. Defining their schemas first lets it import (only the detection ops, which no
test uses, stay unavailable). Models are built with ``weights=None``: nothing is downloaded.
"""

from __future__ import annotations

import types

import pytest


def import_torchvision() -> types.ModuleType:
    """torchvision, importable with the CPU build of torch (see the module docstring)."""
    import torch

    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined: by the extension, or by an earlier call
            pass
    import torchvision

    return torchvision


@pytest.fixture(scope="session")
def torchvision() -> types.ModuleType:
    return import_torchvision()
