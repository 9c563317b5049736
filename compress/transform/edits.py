"""Float64 working copies of parameters, written back once.

Folding a norm and rotating both rows and columns of one weight are several products; done in the
parameter's own dtype each would round again (bfloat16 keeps 8 bits). `Edits` holds each parameter touched
in float64 on the compute device and casts it back once, in place, at `commit` (tensors shared between
modules stay shared).
"""

from __future__ import annotations

import torch
from torch import nn


def compute_device(device: str | torch.device | None) -> torch.device:
    """Where float64 transforms run: `device`, except Apple's MPS (no float64) and None, which mean the CPU."""
    device = torch.device("cpu" if device is None else device)
    return torch.device("cpu") if device.type == "mps" else device


class Edits:
    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = compute_device(device)
        self._work: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def get(self, param: torch.Tensor) -> torch.Tensor:
        """`param`'s current working value (float64, on the compute device)."""
        key = id(param)
        if key not in self._work:
            self._work[key] = (param, param.detach().to(self.device, torch.float64))
        return self._work[key][1]

    def put(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"edit of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")
        self._work[id(param)] = (param, value.to(self.device, torch.float64))

    def commit(self) -> None:
        """Write every working value back into its parameter (its dtype and device), then forget them."""
        with torch.no_grad():
            for param, value in self._work.values():
                param.copy_(value.to(param.device, param.dtype))
        self._work.clear()
