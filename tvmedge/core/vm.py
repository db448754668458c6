"""Call a model's compiled ``main`` with named numpy inputs: the one way tvmedge runs a model,
whether the library was just built on this host (checks, calibration) or loaded from an
artifact here or on a device over RPC (``tvmedge run``, tuning's end-to-end comparison).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _flatten(result: Any) -> list[Any]:
    from tvm.runtime import Tensor

    if isinstance(result, Tensor):
        return [result]
    return [r for item in result for r in _flatten(item)]


class ModelVM:
    """A Relax VM over ``executable`` (a built executable or a loaded library) on ``dev``;
    ``input_names`` give the order of ``main``'s parameters. ``link``: what runs ``main`` on a
    remote device with the input and output data moved outside the RPC stream (an object with
    ``call(module, name, tensors, arrays) -> outputs``, e.g.
    :class:`tvmedge.deploy.shm.SharedMemoryLink`)."""

    def __init__(self, executable: Any, dev: Any, input_names: Sequence[str], link: Any = None) -> None:
        from tvm import relax

        self.dev = dev
        self.input_names = list(input_names)
        self.vm = relax.VirtualMachine(executable, dev)
        self.link = link
        self._main = None  # looked up once: over RPC each lookup is a round trip
        self._args: list[Any] = []  # the link's device inputs, reused call after call

    def tensors(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        """The inputs on the device, in ``main``'s order."""
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self.dev) for n in self.input_names]

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._main is None:
            self._main = self.vm["main"]
        if self.link is None:
            return [o.numpy() for o in _flatten(self._main(*self.tensors(inputs)))]
        import tvm

        arrays = [np.asarray(inputs[n]) for n in self.input_names]
        if [(tuple(a.shape), str(a.dtype)) for a in arrays] != [(tuple(t.shape), str(t.dtype)) for t in self._args]:
            self._args = [tvm.runtime.empty(a.shape, str(a.dtype), self.dev) for a in arrays]
        return self.link.call(self.vm.module, "main", self._args, arrays)

    def time_ms(self, inputs: dict[str, np.ndarray], repeat: int, warmup: int = 2) -> list[float]:
        """Latency of each of ``repeat`` runs, timed by the device's own clock."""
        args = self.tensors(inputs)
        timer = self.vm.time_evaluator("main", self.dev, number=1, repeat=max(1, repeat), min_repeat_ms=0,
                                       cooldown_interval_ms=0)
        for _ in range(warmup):
            self.vm["main"](*args)
        return [r * 1e3 for r in timer(*args).results]
