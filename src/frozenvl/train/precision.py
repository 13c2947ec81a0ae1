"""The dtype discipline of training: fp32 master weights under autocast, the base's dtype outside.

A workflow is built in its base's dtype (bf16 base -> bf16 workflow), and that is the dtype it
runs inference in. Under `precision: bf16/fp16` the trainer keeps the workflow's own trainable
parameters in fp32 while it trains (autocast does the low-precision math, the optimizer updates
fp32 values), and puts them back in their build dtype for every save and when training ends.
Only the workflow's *own* parameters are cast: a LoRA copy shares the frozen base's tensors,
which must keep their dtype and bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class MasterWeights:
    """The workflow's own floating-point parameters and the dtype each was built in."""

    def __init__(self, family: nn.Module, enabled: bool):
        owned = {id(p): p for ps in family.parts().values() for p in ps}  # a parameter may be in two parts
        self._params = [p for p in owned.values() if p.is_floating_point()] if enabled else []
        self._dtypes = [p.dtype for p in self._params]

    @property
    def separate(self) -> bool:
        """Whether the fp32 masters differ in dtype from what inference uses (a bf16/fp16 workflow)."""
        return any(d != torch.float32 for d in self._dtypes)

    def to_fp32(self) -> None:
        """Train from here on: each parameter (the same object, so optimizers keep it) holds fp32."""
        for p in self._params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def to_build_dtype(self) -> None:
        """Training is over: back to the dtype each parameter was built in (the fp32 values are dropped)."""
        for p, dtype in zip(self._params, self._dtypes):
            if p.dtype != dtype:
                p.data = p.data.to(dtype)

    @contextmanager
    def build_dtype(self) -> Iterator[None]:
        """The build dtype for the duration (a save); afterwards the very same fp32 tensors are back,
        so training continues bit for bit."""
        masters = [p.data for p in self._params]
        self.to_build_dtype()
        try:
            yield
        finally:
            for p, master in zip(self._params, masters):
                p.data = master
