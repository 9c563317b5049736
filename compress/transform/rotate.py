"""Fused rotations (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024): R1 and R2 folded into the weights.

R1 rotates the residual stream by an orthogonal Q. With every RMSNorm scale folded into the linears that
read it (`layerwise.transform.fold`) each norm is ``x / rms(x)``, which commutes with Q, so with

- the embedding rows ``E -> E Q`` (the stream starts rotated),
- every linear reading the stream (q/k/v, gate/up, lm_head) ``W -> W Q`` (weight (out, in) @ Q),
- every linear writing it (o_proj, down_proj) ``W -> Qᵀ W`` and its bias ``b -> b Q``,

the model computes the same function while the stream between layers is ``h Q``. R2 rotates each attention
head's values by a head_dim×head_dim orthogonal R: v_proj's rows of KV head j ``-> R_jᵀ W`` (bias ``b R_j``)
and the o_proj columns of every query head reading KV head j ``-> W R_j``. Both spread outlier channels over
many, which is what makes the weights easier to quantize; nothing new runs at inference.

Tied embeddings: after folding the final norm's scale g into the head, the head is ``E diag(g) Q`` while the
embedding is ``E Q``. They are equal only if ``E (diag(g) - I) = 0``, i.e. g is all ones (a uniform g = c
could stay in the norm, since a scalar commutes with Q, but trained norms are not uniform). Leaving the
final norm unfolded does not help: its diagonal does not commute with Q, so ``rms``-normed ``h Q`` times g
is not ``(h-normed · g) Q``. No single shared matrix serves both ends, so a tied head is untied: it becomes a
parameter of its own and ``config.tie_word_embeddings`` is set to False (cost: vocab × hidden more stored
parameters, recorded in `RotationRecord.extra_parameters`).

Online rotations (a Hadamard applied to down_proj's input, or to the KV cache, at run time: QuaRot's R3/R4)
are not offered: they add an operation to the forward pass, which layerwise's kernels and exported
formats cannot carry.

All products are computed in float64 (on `device`) and each weight is cast back to its dtype once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.transform.arch import ArchFacts, architecture, facts_for, tied_head
from layerwise.transform.config import RotationConfig, RotationRecord, head_seed
from layerwise.transform.edits import Edits, compute_device
from layerwise.transform.fold import fold_layer, fold_norm
from layerwise.transform.hadamard import Orthogonal, orthogonal

_ROWS = 4096  # embedding / head rows transformed at a time: bounds the float64 copy for large vocabularies


def rotate_model(model: nn.Module, config: RotationConfig, device: str | torch.device | None = None) -> RotationRecord:
    """Fold and rotate `model` in place as `config` says; what was applied, for the checkpoint's metadata.

    Refuses (LayerwiseError, before changing anything) architectures whose rotation is not exact or unknown,
    and models whose decoder linears are already quantized.
    """
    facts, present, heads = _prepare(model, config)
    layers = decoder_layers(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    q1 = orthogonal(hidden, config.kind, config.seed) if config.r1 else None
    r2_first = None
    done: set[int] = set()
    for i, (layer, linears) in enumerate(zip(layers, present, strict=True)):
        owned = [m for m in [*linears.values(), *_norms(layer, facts)] if id(m) not in done]
        if not owned:
            continue  # tied to an earlier layer: its modules were transformed there
        edits = Edits(device)
        if q1 is not None:
            fold_layer(layer, facts, edits, linears)
            _rotate_stream(linears, facts, q1, edits)
        if heads is not None:
            first = _rotate_heads(linears, facts, heads, config, i, edits)
            r2_first = r2_first or first
        edits.commit()
        done.update(id(m) for m in owned)
    untied, extra = (_rotate_outer(model, facts, q1, device) if q1 is not None else (False, 0))
    return RotationRecord(config.kind, config.stages, config.seed, architecture(model),
                          None if q1 is None else q1.spec, r2_first, folded_norms=q1 is not None,
                          untied_head=untied, extra_parameters=extra)


def check_rotatable(model: nn.Module, config: RotationConfig) -> None:
    """Raise the LayerwiseError `rotate_model` would, without changing the model (before any slow work)."""
    _prepare(model, config)


def _prepare(model: nn.Module, config: RotationConfig):
    facts = facts_for(model, config)
    layers = decoder_layers(model)
    present = [_float_linears(layer, facts, i) for i, layer in enumerate(layers)]
    heads = _heads(model, facts, present) if config.r2 else None
    return facts, present, heads


def _float_linears(layer: nn.Module, facts: ArchFacts, index: int) -> dict[str, nn.Linear]:
    """The layer's linears by name; refuses one the facts do not place, and quantized ones."""
    linears = linear_modules(layer)
    unknown = sorted(set(linears) - facts.known_linears())
    if unknown:
        raise LayerwiseError(f"layer {index} has linears {unknown} that rotation does not know where to place; "
                             "compress without --rotate")
    quantized = sorted(n for n, m in linears.items() if not isinstance(m, nn.Linear))
    if quantized:
        raise LayerwiseError(f"layer {index}: {quantized} are already quantized; rotate the float model, before "
                             "quantizing")
    return linears  # type: ignore[return-value]


def _norms(layer: nn.Module, facts: ArchFacts) -> list[nn.Module]:
    return [layer.get_submodule(name) for name, _ in facts.norm_readers]


def _rotate_stream(linears: dict[str, nn.Linear], facts: ArchFacts, q: Orthogonal, edits: Edits) -> None:
    readers = [n for _, names in facts.norm_readers for n in names]
    for name in readers:
        if name in linears:
            weight = linears[name].weight
            edits.put(weight, q.right(edits.get(weight)))
    for name in facts.writers:
        if name not in linears:
            continue
        module = linears[name]
        edits.put(module.weight, q.right(edits.get(module.weight).T).T)
        if module.bias is not None:
            edits.put(module.bias, q.right(edits.get(module.bias)))


@dataclass(frozen=True)
class _Heads:
    n_heads: int
    n_kv: int
    head_dim: int


def _heads(model: nn.Module, facts: ArchFacts, present: list[dict[str, nn.Linear]]) -> _Heads:
    """Head counts and width, checked against the value and output linears' shapes."""
    config = model.config
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    heads = _Heads(n_heads, n_kv, int(head_dim))
    value_rows = (n_heads + 2 * n_kv) * heads.head_dim if facts.fused_qkv else n_kv * heads.head_dim
    for i, linears in enumerate(present):
        value, out = linears.get(facts.value), linears.get(facts.out)
        if (value is None) != (out is None):
            raise LayerwiseError(f"layer {i} has only one of {facts.value}, {facts.out}; R2 needs both")
        if value is not None and (value.out_features != value_rows or out.in_features != n_heads * heads.head_dim):
            raise LayerwiseError(f"layer {i}: {facts.value} has {value.out_features} outputs and {facts.out} "
                                 f"{out.in_features} inputs, not what {n_heads} heads ({n_kv} KV) of width "
                                 f"{heads.head_dim} need; R2 cannot place the heads")
    if n_heads % n_kv:
        raise LayerwiseError(f"{n_heads} attention heads do not share {n_kv} KV heads evenly; R2 cannot pair them")
    return heads


def _rotate_heads(linears: dict[str, nn.Linear], facts: ArchFacts, heads: _Heads, config: RotationConfig,
                  layer: int, edits: Edits):
    """R2 on one layer (nothing when its attention was dropped); the spec of KV head 0's matrix."""
    value, out = linears.get(facts.value), linears.get(facts.out)
    if value is None or out is None:
        return None
    d = heads.head_dim
    first_row = heads.n_heads * d + heads.n_kv * d if facts.fused_qkv else 0
    group = heads.n_heads // heads.n_kv
    w_v, w_o = edits.get(value.weight).clone(), edits.get(out.weight).clone()
    b_v = None if value.bias is None else edits.get(value.bias).clone()
    first = None
    for j in range(heads.n_kv):
        r = orthogonal(d, config.kind, head_seed(config.seed, layer, j))
        first = first or r.spec
        rows = slice(first_row + j * d, first_row + (j + 1) * d)
        w_v[rows] = r.right(w_v[rows].T).T
        if b_v is not None:
            b_v[rows] = r.right(b_v[rows])
        for h in range(j * group, (j + 1) * group):  # the query heads reading KV head j (repeat_kv's order)
            cols = slice(h * d, (h + 1) * d)
            w_o[:, cols] = r.right(w_o[:, cols])
    edits.put(value.weight, w_v)
    edits.put(out.weight, w_o)
    if b_v is not None:
        edits.put(value.bias, b_v)
    return first


def _rotate_outer(model: nn.Module, facts: ArchFacts, q: Orthogonal, device: str | torch.device | None):
    """Embedding rows by Q; the final norm folded into the head and the head by Q (untied first if tied)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    norm = model.get_submodule(facts.final_norm)
    edits = Edits(device)
    scale = edits.get(norm.weight) + facts.norm_offset
    tied = tied_head(model)
    target = torch.empty_like(head.weight) if tied else head.weight
    _rows_through(head.weight, target, lambda w: q.right(w * scale), device)
    fold_norm(norm, [], facts.norm_offset, edits)  # the scale now lives in the head
    edits.commit()
    extra = 0
    if tied:
        head.weight = nn.Parameter(target, requires_grad=embedding.weight.requires_grad)
        _untie(model)
        extra = target.numel()
    _rows_through(embedding.weight, embedding.weight, q.right, device)
    return tied, extra


def _rows_through(source: torch.Tensor, target: torch.Tensor, transform, device: str | torch.device | None) -> None:
    """``target[rows] = transform(source[rows] in float64)`` a block of rows at a time (may be in place)."""
    where = compute_device(device)
    with torch.no_grad():
        for start in range(0, source.shape[0], _ROWS):
            rows = slice(start, start + _ROWS)
            block = transform(source[rows].detach().to(where, torch.float64))
            target[rows] = block.to(target.device, target.dtype)


def _untie(model: nn.Module) -> None:
    """Record that input and output embeddings are separate tensors, so no loader ties them again."""
    config = model.config
    config.tie_word_embeddings = False
    text = getattr(config, "get_text_config", None)
    if callable(text) and text() is not config:
        text().tie_word_embeddings = False
