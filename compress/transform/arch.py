"""The per-architecture facts rotations need, in one table: which norm feeds which linears, which linears
write the residual stream, where the values are. Architectures not in the table are refused by name.

Names are module paths inside one decoder layer (as `layerwise.model.adapter.linear_modules` names them),
except `final_norm`, a path inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.transform.config import RotationConfig

_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_COVERED = "llama, mistral, qwen2, phi3 and gemma3 (R2 only)"


@dataclass(frozen=True)
class ArchFacts:
    """`norm_readers`: (norm, the linears reading its output) pairs; `writers`: linears adding to the residual
    stream; `value`: the linear whose output holds V (`fused_qkv`: rows q, then k, then v); `out`: the linear
    reading the attention heads; `norm_offset`: the norm multiplies by ``offset + weight`` (gemma: 1);
    `r1_refusal`: why R1 is not exact for this architecture (None: it is)."""

    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...] = _WRITERS
    value: str = "self_attn.v_proj"
    fused_qkv: bool = False
    out: str = "self_attn.o_proj"
    final_norm: str = "model.norm"
    norm_offset: float = 0.0
    r1_refusal: str | None = None

    def known_linears(self) -> set[str]:
        return {n for _, readers in self.norm_readers for n in readers} | set(self.writers) | {self.value, self.out}


_LLAMA = ArchFacts((("input_layernorm", _ATTN_IN), ("post_attention_layernorm", _MLP_IN)))
_PHI3 = ArchFacts((("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
                  value="self_attn.qkv_proj", fused_qkv=True)
# Gemma3's sandwich norms: post_attention_layernorm and post_feedforward_layernorm normalise each sub-layer's
# output and scale it per channel before the residual add. That scale acts on the stream after a
# normalisation: it cannot move into o_proj/down_proj (RMSNorm(x D) != RMSNorm(x) D), and a diagonal that is
# not uniform does not commute with a rotation, so the rotated stream would need a full matrix there.
_GEMMA3 = ArchFacts((("input_layernorm", _ATTN_IN), ("pre_feedforward_layernorm", _MLP_IN)), norm_offset=1.0,
                    r1_refusal="gemma3's sandwich norms (post_attention_layernorm, post_feedforward_layernorm) "
                               "scale each sub-layer's output per channel after normalising it, on the residual "
                               "stream: that scale neither folds into o_proj/down_proj nor commutes with a rotation, "
                               "so R1 is not exact; use --rotate hadamard:r2 (rotate='hadamard:r2') for R2 alone")

ARCHITECTURES: dict[str, ArchFacts] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "phi3": _PHI3, "gemma3_text": _GEMMA3,
}
_LAYERNORM = ("normalises with LayerNorm (mean subtraction and a bias): folding it into the linears is not exact "
              "without extra steps (centring the weights, moving the biases), which layerwise does not take")
REFUSED: dict[str, str] = {"gpt2": _LAYERNORM, "opt": _LAYERNORM}


def architecture(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)


def auto_rotation(model: nn.Module) -> str | None:
    """What ``rotate="auto"`` fuses into `model`: R1 + R2 (``hadamard``) where R1 is exact and costs no
    storage, else nothing.

    A head tied to the embedding must be untied by R1 (`layerwise.transform.rotate`): vocab × hidden more
    parameters, which on small models outweighs the decoder itself (SmolLM2-135M: +113 MB in float32
    beside 43 MB of 3.25-bit decoder weights), so auto leaves tied models unrotated. R2 alone (all gemma3
    allows) is not chosen either: on the default model it raised GPTQ's 3-bit perplexity (docs/rotation.md).
    """
    facts = ARCHITECTURES.get(architecture(model))
    if facts is None or facts.r1_refusal is not None or tied_head(model):
        return None
    return "hadamard"


def tied_head(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the input embedding."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None:
        return False
    if head.weight is embedding.weight:
        return True
    on_meta = head.weight.device.type == "meta" or embedding.weight.device.type == "meta"  # no storage to compare
    return not on_meta and head.weight.data_ptr() == embedding.weight.data_ptr()


def facts_for(model: nn.Module, config: RotationConfig) -> ArchFacts:
    """The facts of `model`'s architecture, or a LayerwiseError naming why `config` cannot be applied to it."""
    arch = architecture(model)
    if arch in REFUSED:
        raise LayerwiseError(f"rotation is not offered for {arch}: it {REFUSED[arch]}; rotation covers {_COVERED}")
    facts = ARCHITECTURES.get(arch)
    if facts is None:
        raise LayerwiseError(f"rotation does not know the layout of {arch!r} (which norms feed which linears); it "
                             f"covers {_COVERED}: compress without --rotate")
    if config.r1 and facts.r1_refusal is not None:
        raise LayerwiseError(f"rotation R1 is refused for {arch}: {facts.r1_refusal}")
    return facts
