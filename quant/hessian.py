"""`HessianAccumulator`: the input second-moment matrix GPTQ needs, gathered from calibration forwards.

For a linear ``y = x W^T`` the layer-wise reconstruction loss ``||X W^T - X Q^T||_F^2`` is a quadratic in
each output row of ``Q`` with Hessian ``H = 2 X^T X``. GPTQ uses it normalised by the token count,
``H = (2/n) sum_t x_t x_t^T``, so its scale does not depend on how much calibration data was used (the
relative damping GPTQ adds is then meaningful whatever n is).

Precision: each batch's ``X^T X`` is formed in float32, the costly part of calibration (float32 matmuls run
at full speed everywhere, float64 ones 2x to 64x slower). The batches are added in a compensated sum
(`layerwise.core.summation`, about 77 bits), so H does not depend on the order the batches came in or on
how they were split among ranks, and H is then rounded to float32, the precision GPTQ works in. While the
forwards run, H's sum holds 12 bytes per entry of its upper triangle, 1.5 times a float32 H (a cross term's,
whole, 3 times); each sum is freed once its matrix is formed.

GPTAQ (`layerwise.quant.gptaq`) also needs, per linear, the cross term ``C = (2/n) sum_t dx_t x_t^T`` between
the quantized stream's inputs x and the full-precision model's inputs to the same linear, ``dx = x_fp - x``
(`CrossTermAccumulator`); `SharedInputHessians` gathers it beside H when asked, pairing each batch's inputs
of the two streams (`reference_pass`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.summation import CompensatedSum
from layerwise.model.adapter import LINEAR_TYPES, linear_shape, linear_weight

# Rows of ``AᵀB`` formed per matmul. A symmetric M is formed and kept from its diagonal on, block by block:
# half the arithmetic and half the sum's memory, for a few hundred rows of waste below the diagonal.
BLOCK_ROWS = 256


class _RunningMoment:
    """``M = (2/n) sum_t a_t b_tᵀ`` over the tokens one linear sees: the (K, K) float32 matrix
    `HessianAccumulator` (a = b = x, symmetric) and `CrossTermAccumulator` (a = the input's shift, b = x) keep.

    Each batch's ``AᵀB`` is formed in float32 (the costly matmul), `BLOCK_ROWS` rows at a time (from the
    diagonal on when M is symmetric), and added into a `CompensatedSum`, whose value does not depend on the
    order or grouping of the batches. So N ranks that each add their share of the windows (one window per
    batch, as calibration runs) and then sum their parts get the bits one process gets: the reason GPTQ's
    codes are the same on any number of ranks. M is formed from the sum when first read, normalised by the
    token count in float64, rounded once to float32, and made exactly symmetric when it is.
    """

    _what = "matrix"
    _symmetric = False

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if not isinstance(in_features, int) or in_features < 1:
            raise LayerwiseError(f"a {self._what} needs a positive number of input features, got {in_features!r}")
        self.in_features = in_features
        # Each block of rows, with the first column it keeps and where its entries start in the sum.
        self._blocks: list[tuple[int, int, int, int]] = []
        size = 0
        for top in range(0, in_features, BLOCK_ROWS):
            bottom, left = min(top + BLOCK_ROWS, in_features), top if self._symmetric else 0
            self._blocks.append((top, bottom, left, size))
            size += (bottom - top) * (in_features - left)
        self._sum: CompensatedSum | None = CompensatedSum(size, device=device)
        self._moment: torch.Tensor | None = None  # M, formed from the sum when first read
        self._n_tokens = 0

    @property
    def n_tokens(self) -> int:
        """Rows (tokens) accumulated so far; the matrix has rank at most this."""
        return self._n_tokens

    def _open_sum(self) -> CompensatedSum:
        if self._sum is None:
            raise LayerwiseError(f"this {self._what} was sealed once read for quantization; it takes no more inputs")
        return self._sum

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(-1, self.in_features).to(device=self._open_sum().device, dtype=torch.float32)

    def _fold(self, a: torch.Tensor, b: torch.Tensor) -> None:
        total = self._open_sum()
        for top, bottom, left, at in self._blocks:
            total.add(a[:, top:bottom].T @ b[:, left:], at)
        self._n_tokens += b.shape[0]
        self._moment = None

    def merge_ranks(self) -> None:
        """Make M the one over every rank's tokens: the ranks' sums added in rank order (`CompensatedSum`) and
        their token counts summed. Nothing happens on one process."""
        if dist.is_alone():
            return
        self._open_sum().merge_ranks()
        self._n_tokens = int(dist.sum_floats([float(self._n_tokens)])[0])
        self._moment = None

    def seal(self) -> None:
        """Form M and free the sum behind it: no input can be added after this."""
        if self._n_tokens:
            self._value("")
        self._sum = None

    def _value(self, why_empty: str) -> torch.Tensor:
        """M itself (not a copy, to spare K^2 memory); raises when no token was added."""
        if self._n_tokens == 0:
            raise LayerwiseError(f"no calibration inputs reached this linear, so it has no {self._what}; {why_empty}")
        if self._moment is None:
            self._moment = self._formed()
        return self._moment

    def _formed(self) -> torch.Tensor:
        total, k, scale = self._open_sum(), self.in_features, 2.0 / self._n_tokens
        moment = torch.empty(k, k, dtype=torch.float32, device=total.device)
        for top, bottom, left, at in self._blocks:
            size = (bottom - top) * (k - left)
            moment[top:bottom, left:] = total.value(at, at + size).mul_(scale).view(bottom - top, k - left)
        if self._symmetric:  # below the diagonal: the transpose of what is above it
            for top, bottom, _, _ in self._blocks:
                moment[top:bottom, :top] = moment[:top, top:bottom].T
                square = moment[top:bottom, top:bottom]
                square.copy_(square.triu() + square.triu(1).T)
        return moment


class HessianAccumulator(_RunningMoment):
    """Running ``H = (2/n) sum x x^T`` over every input row (token) seen by one linear."""

    _what = "Hessian"
    _symmetric = True

    @property
    def hessian(self) -> torch.Tensor:
        """The (in_features, in_features) float32 H -- itself, not a copy, to spare K^2 memory.

        Raises when no token was added: an all-zero H would make GPTQ treat every input as dead and zero
        the whole weight, a silent disaster instead of an error.
        """
        return self._value("check that the calibration forward passes run through the module the hook was "
                           "registered on")

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs of shape ``(..., in_features)``; every leading index is one token.

        Inputs are cast to float32 first: a bf16/fp16 ``X^T X`` would overflow or lose the small
        eigen-directions GPTQ relies on.
        """
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise LayerwiseError(
                f"calibration input of shape {tuple(x.shape)} does not end in in_features={self.in_features}"
            )
        rows = self._rows(x)
        if rows.shape[0]:
            self._fold(rows, rows)

    def hook(self, module: nn.Module) -> RemovableHandle:
        """Collect every input `module` (an ``nn.Linear`` or transformers ``Conv1D``) sees in a forward.

        Returns the hook's handle; the caller removes it (``handle.remove()``) once calibration is done,
        because a forgotten hook keeps adding K^2 work to every later forward.
        """
        in_features = _check_linear(module)
        if in_features != self.in_features:
            raise LayerwiseError(f"this accumulator is for {self.in_features} inputs but the module has {in_features}")
        return _hook_inputs(module, self.add)


class CrossTermAccumulator(_RunningMoment):
    """Running ``C = (2/n) sum_t (x_fp_t - x_t) x_t^T`` over the tokens one linear sees in both streams.

    ``C[i, j]`` pairs input i's shift (full precision minus quantized stream) with input j of the quantized
    stream. Kept on the scale of `HessianAccumulator`'s H (the same ``2/n``): GPTAQ only reads C through
    ``C H^-1``, so the two must share their normalisation, whatever it is.
    """

    _what = "cross term"

    @property
    def cross(self) -> torch.Tensor:
        """The (in_features, in_features) float32 C (itself, not a copy); raises when no token was added."""
        return self._value("check that both streams' forwards run through the module")

    def add(self, x: torch.Tensor, reference: torch.Tensor) -> None:
        """Fold in a batch of quantized-stream inputs `x` and the full-precision inputs of the same tokens."""
        if x.shape != reference.shape or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise LayerwiseError(
                f"the full-precision inputs of shape {tuple(reference.shape)} do not pair with the quantized "
                f"stream's {tuple(x.shape)} (both must end in in_features={self.in_features}, token for token)"
            )
        rows = self._rows(x)
        if rows.shape[0]:
            # Not in place: `reference` may be a view of an activation the stream still needs.
            self._fold(self._rows(reference) - rows, rows)


@dataclass
class AsymmetricHessian:
    """What GPTAQ reads for one input: the quantized stream's H and the cross term C with the full-precision
    stream (both (in_features, in_features) float32, normalised alike)."""

    hessian: torch.Tensor
    cross: torch.Tensor


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

    Modules named in `cross` (GPTAQ's) also get the cross term with the full-precision model's inputs: each
    batch's forward on the full-precision stream runs first under `reference_pass()`, which records every
    module's input, then the same batch's forward on the quantized stream under the context manager, which
    pairs each input with the recorded one and forgets them on exit (one batch of each stream held at a time).
    Their entry in `hessians()` is then an `AsymmetricHessian`, likewise shared by modules that share an input.

    In a process group each rank reads its share of the windows and `hessians()` sums the ranks' parts; with
    `across_ranks` False every rank read all of them, and its own sums are the whole.
    """

    def __init__(self, modules: dict[str, nn.Module], cross: Iterable[str] = (), *, across_ranks: bool = True) -> None:
        self.in_features = {name: _check_linear(module) for name, module in modules.items()}
        self.modules = modules
        self.cross = frozenset(cross)
        if not self.cross <= set(modules):
            raise ValueError(f"cross terms asked for modules not collected: {sorted(self.cross - set(modules))}")
        self.accumulators: dict[str, HessianAccumulator] = {}  # by the name of the module that accumulates
        self.crosses: dict[str, CrossTermAccumulator] = {}  # likewise, when some module needs cross terms
        self.source: dict[str, str] = {}  # module name -> name of the module whose accumulator it uses
        # Weak references: a freed input can never be mistaken for a new tensor that reuses its address.
        self._recent: list[tuple[weakref.ref[torch.Tensor], str]] = []
        self._handles: list[RemovableHandle] = []
        self._reference: dict[str, torch.Tensor] = {}  # this batch's full-precision input of every module
        self._across_ranks = across_ranks
        self._finished = False

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
            if self.cross:  # for every input: which modules share one is known only once they have read it
                self.crosses[name] = CrossTermAccumulator(self.in_features[name], device=device)
        self.accumulators[name].add(x)
        if self.cross:
            if name not in self._reference:
                raise LayerwiseError(f"module {name} has no full-precision input for this batch: run the batch on "
                                     "the full-precision stream under reference_pass() first")
            self.crosses[name].add(x, self._reference[name])
        self._recent.append((weakref.ref(x), name))

    @contextmanager
    def reference_pass(self) -> Iterator[None]:
        """Record every module's input of the forward run inside: the full-precision stream's, of the batch
        the next quantized-stream forward (under the context manager) runs."""
        self._reference = {}

        def record(name: str, x: torch.Tensor) -> None:
            self._reference[name] = x.detach()

        handles = [_hook_inputs(module, functools.partial(record, name)) for name, module in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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
        self._reference = {}

    def _finish(self) -> None:
        """Once, after the forwards: each H and C summed over the ranks of a process group (their share of the
        windows each), in the order of the modules' names, which every rank shares; then formed and its sum
        freed, one at a time, so the sums' memory is given back as the matrices are made."""
        if self._finished:
            return
        self._finished = True
        for name in sorted(self.accumulators):
            for accumulator in (self.accumulators[name], self.crosses.get(name)):
                if accumulator is not None:
                    if self._across_ranks:
                        accumulator.merge_ranks()
                    accumulator.seal()

    def hessians(self) -> dict[str, torch.Tensor | AsymmetricHessian]:
        """Every module's H (an `AsymmetricHessian` for those in `cross`); raises (naming the module) for one
        that no calibration input reached."""
        missing = [n for n in self.modules if n not in self.source]
        if missing:
            raise LayerwiseError(
                f"no calibration inputs reached {missing}, so they have no Hessian; check that the calibration "
                "forward passes run through these modules"
            )
        self._finish()
        paired: dict[str, AsymmetricHessian] = {}  # by owner: one object per input, so sweeps can be shared
        out: dict[str, torch.Tensor | AsymmetricHessian] = {}
        for name in self.modules:
            owner = self.source[name]
            hessian = self.accumulators[owner].hessian
            if name in self.cross:
                out[name] = paired.setdefault(owner, AsymmetricHessian(hessian, self.crosses[owner].cross))
            else:
                out[name] = hessian
        return out

    def token_counts(self) -> dict[str, tuple[int, int]]:
        """(tokens seen, in_features) per module, for the too-few-tokens warning (over every rank once
        `hessians()` has summed them)."""
        counts = {}
        for name in self.source:
            acc = self.accumulators[self.source[name]]
            counts[name] = (acc.n_tokens, acc.in_features)
        return counts
