"""``gguf`` export: one llama.cpp file, each decoder linear in the type its plan entry names.

Written with the `gguf` package's `GGUFWriter`. Names, metadata and conventions follow llama.cpp's
``convert_hf_to_gguf.py`` and ``src/llama-quant.cpp`` (docs/export.md):

* architectures ``llama`` (and Mistral, which llama.cpp runs as ``llama``) and ``qwen2``; tensor names
  ``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``, ``output_norm``, ``output``; norms in F32;
* llama's q and k rows are permuted for llama.cpp's rotary layout (pairs of neighbouring values, where
  transformers rotates the two halves of a head); qwen2 runs the halves layout and is not permuted. Blocks
  run along a row, so permuting rows moves whole blocks and changes no value;
* a module quantized to a GGUF type (``--options q4_k,...``) is written as its stored blocks, exactly. A
  module on layerwise's integer grid whose groups are whole blocks of 32 keeps its codes and scales
  (`_grid_for_int`): symmetric 2/3/4-bit as ``q4_0`` and 8-bit as ``q8_0``, exactly; asymmetric 2/3/4-bit
  as ``q4_1`` with the min ``-zero * scale`` rounded to fp16, exact where that product is an fp16 number.
  Otherwise (asymmetric 8-bit, groups that are not whole blocks) the dequantized weight is quantized again
  to ``q8_0`` / ``q4_1``. The export says how many modules were not exact;
* the embedding, and the head when it is not tied, are written as `ExportSettings.gguf_embeddings`
  says: ``q8_0`` by default, which is what llama.cpp's own quantizer gives a tied head whose rows are not
  whole 256-weight super-blocks, as SmolLM2's are not (it uses ``q6_k`` for an untied head where they
  are); ``f16`` or ``f32`` keep them as they are. A tied head is not written: llama.cpp reuses the embedding.
* tokenizer: the vocabulary, token types and BPE merges of the checkpoint's tokenizer
  (``tokenizer.ggml.model = gpt2``, byte-level BPE); its pre-tokenizer is written as ``default``, which
  llama.cpp accepts with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerwise.core.gguf_types import GGUF_TYPES
from layerwise.output.checkpoint import Checkpoint
from layerwise.output.export_common import (
    EXPORTERS,
    ExportedWeight,
    Exporter,
    ExportSettings,
    Problem,
    non_linear_reasons,
    quantized_weights,
)
from layerwise.quant import QuantLinear
from layerwise.quant.gguf_grid import GgufGrid, gguf_grid, pack_blocks

# HF model_type -> llama.cpp architecture, and whether q/k rows are permuted for its rotary layout.
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
EMBEDDING_TYPES = ("q8_0", "f16", "f32")


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for a q or k projection (rows of a weight, of its blocks, or a bias)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _grid_for_int(w: ExportedWeight) -> tuple[str, torch.Tensor, GgufGrid | None, bool]:
    """The llama.cpp type for a module on layerwise's integer grid, its codes on that type, the grid, and
    whether the type holds the weight exactly; the grid is None when the weight must be quantized again.

    Our weight is ``(q - z) * s`` per group. Symmetric (z = 2**(b-1)) is q4_0's / q8_0's ``d * c`` with
    ``c = q - z``: exact. Asymmetric up to 4 bits is q4_1's ``d * q + m`` with ``d = s`` and ``m = -z * s``
    rounded to fp16 (q4_1 stores m in fp16; the product of an fp16 scale and a zero point needs up to 15
    significant bits), so it is exact where that product is an fp16 number and off by m's rounding elsewhere.
    """
    bits, width = w.spec.bits, w.width
    if width % 32 or w.in_features % 32 or (bits == 8 and not w.spec.sym):
        return ("q8_0" if bits == 8 else "q4_1"), torch.empty(0), None, False
    blocks = w.in_features // 32

    def per_block(groups: torch.Tensor) -> torch.Tensor:
        return groups.repeat_interleave(width // 32, dim=1)[:, :blocks].to(torch.float32)

    scales, zeros = per_block(w.scales), per_block(w.zeros)
    if w.spec.sym:
        kind = GGUF_TYPES["q8_0" if bits == 8 else "q4_0"]
        grid = GgufGrid(kind, scales, torch.zeros_like(scales), scales)
        return kind.name, (w.codes - w.zeros[:, :1]).to(torch.int32), grid, True
    exact_min = -(zeros * scales)
    mins = exact_min.to(torch.float16).to(torch.float32)
    grid = GgufGrid(GGUF_TYPES["q4_1"], scales, mins, scales, dmin=mins)
    return "q4_1", w.codes.to(torch.int32), grid, bool(torch.equal(mins, exact_min))


def module_blocks(module: QuantLinear, w: ExportedWeight | None) -> tuple[str, np.ndarray, bool]:
    """(GGUF type, uint8 blocks (rows, row bytes), exact) for one quantized module; `w` is its integer
    codes when it is on layerwise's integer grid, None when it already holds GGUF blocks."""
    if w is None:
        assert module.gguf is not None
        return module.gguf, module.qweight.cpu().numpy(), True
    kind_name, codes, grid, exact = _grid_for_int(w)
    if grid is not None:
        return kind_name, pack_blocks(grid, codes).numpy(), exact
    weight = module.dequantize(torch.float32)
    regrid = gguf_grid(weight, GGUF_TYPES[kind_name])
    return kind_name, pack_blocks(regrid, regrid.codes(weight)).numpy(), False


class GgufExporter(Exporter):
    name = "gguf"
    title = "a GGUF file for llama.cpp"
    advice = "Load it with layerwise.load, or export it as compressed-tensors."
    single_file = True

    def check(self, ckpt: Checkpoint, settings: ExportSettings) -> list[Problem]:
        model_type = ckpt.model.config.model_type
        if model_type not in ARCHITECTURES:
            return [Problem(f"architecture {model_type!r} has no GGUF mapping here (layerwise writes "
                            f"{', '.join(sorted(ARCHITECTURES))})", "Export it as compressed-tensors instead.")]
        weights = quantized_weights(ckpt.model)
        problems = non_linear_reasons(ckpt, weights)
        narrow = tuple(w.name for w in weights if w.in_features % 32)
        if narrow:
            problems.append(Problem("rows are not whole 32-weight blocks, the smallest llama.cpp holds",
                                    "Keep these modules unquantized, or export as compressed-tensors.", narrow))
        return problems

    def write(self, ckpt: Checkpoint, out: Path, settings: ExportSettings) -> str:
        summary = write_gguf(ckpt, out, settings)
        counts: dict[str, int] = {}
        for kind in summary["types"].values():
            counts[kind] = counts.get(kind, 0) + 1
        said = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        again = summary["requantized"]
        if again:
            said += (f"; {len(again)} modules on layerwise's integer grid are not exactly a llama.cpp type (their "
                     "q4_1 min is rounded to fp16, or they were quantized again): compress with --target gguf "
                     "for an exact export")
        return f"tensors: {said}"


def write_gguf(ckpt: Checkpoint, path: Path, settings: ExportSettings) -> dict[str, Any]:
    """Write the GGUF file; returns what was written how (type per tensor, which were quantized again)."""
    import gguf

    config = ckpt.model.config
    arch, permuted = ARCHITECTURES[config.model_type]
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(str(ckpt.meta.get("model", "layerwise export")))
    _add_hyperparameters(writer, config, n_head, n_kv)
    if ckpt.tokenizer is not None:
        _add_tokenizer(writer, ckpt.tokenizer, config.vocab_size)
    summary: dict[str, Any] = {"types": {}, "requantized": []}
    modules = {name: m for name, m in ckpt.model.named_modules() if isinstance(m, QuantLinear)}
    exported = {w.name: w for w in quantized_weights(ckpt.model)}
    state = ckpt.model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def add(name: str, array: np.ndarray, raw: str | None = None) -> None:
        if raw is None:
            writer.add_tensor(name, array)
            summary["types"][name] = str(array.dtype)
        else:
            writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType[raw.upper()])
            summary["types"][name] = raw

    def dense(name: str, tensor: torch.Tensor, kind: str) -> None:
        values = tensor.detach().to(torch.float32)
        if kind == "f32":
            add(name, values.numpy())
        elif kind == "f16":
            add(name, values.to(torch.float16).numpy())
        else:
            grid = gguf_grid(values, GGUF_TYPES[kind])
            add(name, pack_blocks(grid, grid.codes(values)).numpy(), kind)

    dense("token_embd.weight", state["model.embed_tokens.weight"], settings.gguf_embeddings)
    add("output_norm.weight", state["model.norm.weight"].to(torch.float32).numpy())
    if not tied:
        dense("output.weight", state["lm_head.weight"], settings.gguf_embeddings)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, short in LAYER_NAMES.items():
            name = f"blk.{i}.{short}"
            full = prefix + hf
            head_count = n_head if hf.endswith("q_proj") else n_kv
            rotate = permuted and (hf.endswith("q_proj") or hf.endswith("k_proj"))
            if full in modules:
                kind, blocks, exact = module_blocks(modules[full], exported.get(full))
                data = torch.from_numpy(blocks)
                if rotate:
                    data = permute_rows(data, head_count)
                add(f"{name}.weight", data.numpy(), kind)
                if not exact:
                    summary["requantized"].append(full)
            elif f"{full}.weight" in state:
                tensor = state[f"{full}.weight"].to(torch.float32)
                if rotate:
                    tensor = permute_rows(tensor, head_count)
                add(f"{name}.weight", tensor.numpy())  # kept layers and norms stay float32
            bias = state.get(f"{full}.bias")
            if bias is not None:
                bias = bias.to(torch.float32)
                add(f"{name}.bias", (permute_rows(bias, head_count) if rotate else bias).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return summary


def _add_hyperparameters(writer: Any, config: Any, n_head: int, n_kv: int) -> None:
    """The architecture's metadata llama.cpp reads (``load_hparams``): sizes, heads, norm epsilon, rope."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer's vocabulary, token types and merges, as llama.cpp's ``gpt2`` model reads them.

    The token list has the model's `vocab_size` entries (llama.cpp takes its length as the embedding's rows):
    ids the tokenizer does not use are filled with ``[PAD<id>]``, as llama.cpp's converter does, and tokens
    beyond the embedding are left out."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            tokens[index] = token
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 control, 1 normal
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    pad = tokenizer.pad_token_id
    if pad is None or pad >= vocab_size:  # no pad, or one outside the embedding: llama.cpp pads with eos
        pad = tokenizer.eos_token_id
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", pad)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)


EXPORTERS.register(GgufExporter.name)(GgufExporter())
