"""`HessianAccumulator`: the input second-moment matrix GPTQ needs, gathered from calibration forwards.

For a linear ``y = x W^T`` the layer-wise reconstruction loss ``||X W^T - X Q^T||_F^2`` is a quadratic in
each output row of ``Q`` with Hessian ``H = 2 X^T X``. GPTQ uses it normalised by the token count,
``H = (2/n) sum_t x_t x_t^T``, so its scale does not depend on how much calibration data was used (the
relative damping GPTQ adds is then meaningful whatever n is).

Precision: H is kept in float32. Forming ``X^T X`` is the costly part of calibration, and float32 matmuls
run at full speed everywhere while float64 is 2x (CPU) to 64x (consumer GPUs) slower and doubles the
memory of a (K, K) matrix that is held for every linear of a layer at once. The rounding this leaves in
H (about 1e-7 relative per batch) is five orders of magnitude below the 1% diagonal damping GPTQ adds
before inverting, so float64 would not change the quantized codes.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import LINEAR_TYPES, linear_shape, linear_weight


class HessianAccumulator:
    """Running ``H = (2/n) sum x x^T`` over every input row (token) seen by one linear.

    Kept as a running mean rather than a running sum: adding a batch of m rows to n seen ones sets
    ``H <- (n H + 2 X^T X) / (n + m)``, which weights every token equally whatever the batch sizes (so two
    batches give the same H as their concatenation) and keeps H at the scale of ``x^2`` however many
    tokens arrive, far from float32 overflow.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if not isinstance(in_features, int) or in_features < 1:
            raise LayerwiseError(f"a Hessian needs a positive number of input features, got {in_features!r}")
        self.in_features = in_features
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._n_tokens = 0

    @property
    def n_tokens(self) -> int:
        """Rows (tokens) accumulated so far; H has rank at most this."""
        return self._n_tokens

    @property
    def hessian(self) -> torch.Tensor:
        """The (in_features, in_features) float32 H -- the live buffer, not a copy, to spare K^2 memory.

        Raises when no token was added: an all-zero H would make GPTQ treat every input as dead and zero
        the whole weight, a silent disaster instead of an error.
        """
        if self._n_tokens == 0:
            raise LayerwiseError(
                "no calibration inputs reached this linear, so it has no Hessian; check that the calibration "
                "forward passes run through the module the hook was registered on"
            )
        return self._hessian

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs of shape ``(..., in_features)``; every leading index is one token.

        Inputs are cast to float32 first: a bf16/fp16 ``X^T X`` would overflow or lose the small
        eigen-directions GPTQ relies on.
        """
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise LayerwiseError(
                f"calibration input of shape {tuple(x.shape)} does not end in in_features={self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features)
        added = rows.shape[0]
        if added == 0:
            return
        rows = rows.to(device=self._hessian.device, dtype=torch.float32)
        total = self._n_tokens + added
        self._hessian.mul_(self._n_tokens / total)
        self._hessian.addmm_(rows.T, rows, alpha=2.0 / total)
        self._n_tokens = total

    def hook(self, module: nn.Module) -> RemovableHandle:
        """Collect every input `module` (an ``nn.Linear`` or transformers ``Conv1D``) sees in a forward.

        Returns the hook's handle; the caller removes it (``handle.remove()``) once calibration is done,
        because a forgotten hook keeps adding K^2 work to every later forward.
        """
        in_features = _check_linear(module)
        if in_features != self.in_features:
            raise LayerwiseError(f"this accumulator is for {self.in_features} inputs but the module has {in_features}")
        return _hook_inputs(module, self.add)


def _check_linear(module: nn.Module) -> int:
    """The module's in_features, after checking it is a linear layer Hessians can be collected for."""
    if not isinstance(module, LINEAR_TYPES):
        raise LayerwiseError(
            f"cannot collect a Hessian for a {type(module).__name__}; only nn.Linear and Conv1D are supported"
        )
    return linear_shape(module)[1]


def _hook_inputs(module: nn.Module, collect: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Call `collect` with every input `module` receives in a forward; returns the hook's handle."""

    def hook(_module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], _output: object) -> None:
        # Both nn.Linear and Conv1D take the activations as their one argument, positional or named.
        x = args[0] if args else next(iter(kwargs.values()))
        assert isinstance(x, torch.Tensor)
        collect(x)

    return module.register_forward_hook(hook, with_kwargs=True)


class SharedInputHessians:
    """Hessians of several linears of one layer, computed once per distinct input tensor.

    Attention's q, k and v projections (and an MLP's gate and up projections) read the very same tensor,
    so their Hessians are equal; accumulating ``X^T X`` once for the group instead of once per module is
    about a quarter of a llama layer's calibration arithmetic. Sharing is decided by tensor identity
    during the forward (the first module to see a tensor accumulates it, the others follow it), never by
    name, so an architecture whose projections read different tensors simply gets one Hessian each.
    Use as a context manager around the calibration forwards; `hessians()` then maps every module name to
    its H, the same tensor object for modules that share an input.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.in_features = {name: _check_linear(module) for name, module in modules.items()}
        self.modules = modules
        self.accumulators: dict[str, HessianAccumulator] = {}  # by the name of the module that accumulates
        self.source: dict[str, str] = {}  # module name -> name of the module whose accumulator it uses
        # Weak references: a freed input can never be mistaken for a new tensor that reuses its address.
        self._recent: list[tuple[weakref.ref[torch.Tensor], str]] = []
        self._handles: list[RemovableHandle] = []

    def _collect(self, name: str, x: torch.Tensor) -> None:
        self._recent = [(ref, owner) for ref, owner in self._recent if ref() is not None]
        owner = next((owner for ref, owner in self._recent if ref() is x), name)
        if self.source.setdefault(name, owner) != owner:
            raise LayerwiseError(
                f"module {name} shared its input with {self.source[name]} in one calibration batch but not in "
                "another; this layer's forward is not deterministic in structure, so Hessians cannot be shared"
            )
        if owner != name:
            return
        if name not in self.accumulators:
            device = linear_weight(self.modules[name]).device
            self.accumulators[name] = HessianAccumulator(self.in_features[name], device=device)
        self.accumulators[name].add(x)
        self._recent.append((weakref.ref(x), name))

    def __enter__(self) -> SharedInputHessians:
        self._handles = [
            _hook_inputs(module, functools.partial(self._collect, name)) for name, module in self.modules.items()
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recent = []

    def hessians(self) -> dict[str, torch.Tensor]:
        """Every module's H; raises (naming the module) for one that no calibration input reached."""
        missing = [n for n in self.modules if n not in self.source]
        if missing:
            raise LayerwiseError(
                f"no calibration inputs reached {missing}, so they have no Hessian; check that the calibration "
                "forward passes run through these modules"
            )
        return {name: self.accumulators[self.source[name]].hessian for name in self.modules}

    def token_counts(self) -> dict[str, tuple[int, int]]:
        """(tokens seen, in_features) per module, for the too-few-tokens warning."""
        counts = {}
        for name in self.source:
            acc = self.accumulators[self.source[name]]
            counts[name] = (acc.n_tokens, acc.in_features)
        return counts
