"""Placements (layerwise.model.placement): one decoder layer on the device at a time, in the placement's dtype.

There is no GPU here, so the "device" is the CPU in bfloat16 while the model's home is float32: a layer on
the device is recognisable by the dtype of its parameters, and every test below would fail if a layer
stayed home during its step, stayed on the device after it, or came back rounded.
"""

from __future__ import annotations

import copy
import math

import pytest
import safetensors.torch
import torch
from conftest import random_windows, tiny_config, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import layerwise.model.placement as placement_module
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.engine.applier import apply_plan, resolve_methods
from layerwise.engine.streaming import StreamedModel
from layerwise.eval.perplexity import perplexity_on_windows
from layerwise.importance import score_model
from layerwise.importance import sensitivity as sensitivity_module
from layerwise.importance.ppl_drop import bypassed
from layerwise.importance.sensitivity import output_fisher
from layerwise.model.adapter import decoder_layers, layer_linear_shapes
from layerwise.model.driver import stream_layers
from layerwise.model.placement import (
    Activations,
    Placement,
    activations_stay,
    onloaded,
    oom_as_error,
    sequential_onload,
)
from layerwise.model.shards import write_safetensors
from layerwise.output.checkpoint import load_checkpoint, save_checkpoint
from layerwise.planning.planners import uniform_plan
from layerwise.quant import QuantLinear, quantize_module

BF16 = Placement("cpu", torch.bfloat16)


def dtypes(module: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_placement_is_normalised_and_validated():
    assert Placement("cpu", "bf16") == Placement(torch.device("cpu"), torch.bfloat16)
    assert Placement.cpu() == Placement(torch.device("cpu"), torch.float32)
    assert Placement("cpu", "fp16").dtype is torch.float16  # the CLI refuses it on the CPU, a Placement does not
    with pytest.raises(LayerwiseError, match="floating dtype"):
        Placement("cpu", torch.int8)
    with pytest.raises(LayerwiseError, match="unknown dtype"):
        Placement("cpu", "int4")
    with pytest.raises(LayerwiseError, match="meta device"):
        Placement("meta")


def test_onloaded_puts_back_the_original_tensors_and_sends_new_modules_home():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    originals = dict(layer.named_parameters())
    values = {n: p.detach().clone() for n, p in originals.items()}
    with onloaded(layer, BF16) as onload:
        assert onload is not None and onload.moved
        assert dtypes(layer) == {torch.bfloat16}
        quantized = quantize_module(layer[0], QuantSpec(4, 32, "rtn"))  # made "on the device"
        assert quantized.bias is not None and quantized.bias.dtype == torch.bfloat16
        layer[0] = quantized
    assert layer[1].weight is originals["1.weight"] and dtypes(layer) == {torch.float32}
    assert all(torch.equal(originals[n], v) for n, v in values.items())  # not rounded through bf16
    q = layer[0]
    assert isinstance(q, QuantLinear) and q.bias.dtype == torch.float32  # the model's dtype again
    assert (q.qweight.dtype, q.scales.dtype, q.zeros.dtype) == (torch.int32, torch.float16, torch.int32)
    with onloaded(layer, None) as nothing:
        assert nothing is None


def test_stream_onloads_only_the_layer_of_the_step(arch):
    model = tiny_model(arch, n_layers=3)
    windows = random_windows(4, 16)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    layers = decoder_layers(model)
    reference = [torch.cat(step.run()) for step in stream_layers(model, windows, batch_size=2, progress=False)]
    seen = []
    for step in stream_layers(model, windows, batch_size=2, progress=False, placement=BF16):
        seen.append(step.index)
        for j, layer in enumerate(layers):
            assert dtypes(layer) == ({torch.bfloat16} if j == step.index else {torch.float32}), (step.index, j)
        assert model.get_input_embeddings().weight.dtype == torch.float32  # outside the layers: home
        assert isinstance(step.inputs, Activations) and {h.dtype for h in step.inputs} == {torch.bfloat16}
        outputs = step.run()
        assert isinstance(outputs, Activations) and len(outputs) == 2
        assert relative(torch.cat(list(outputs)), reference[step.index]) < 0.05
    assert seen == [0, 1, 2]
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)


def test_placement_in_the_models_own_dtype_changes_nothing():
    model = tiny_model("llama", n_layers=2)
    windows = random_windows(8, 16)
    plain = [torch.cat(step.run()) for step in stream_layers(model, windows, progress=False)]
    for placement in (Placement.cpu(), Placement("cpu", torch.float32, offload_activations=True)):
        placed = []
        for step in stream_layers(model, windows, progress=False, placement=placement):
            assert step.offload == bool(placement.offload_activations)
            placed.append(torch.cat(list(step.run())))
        assert all(torch.equal(a, b) for a, b in zip(plain, placed, strict=True))
    plan = uniform_plan(layer_linear_shapes(model), 4, 32, method="gptq")
    quantized = [copy.deepcopy(model), copy.deepcopy(model)]
    apply_plan(quantized[0], plan, "gptq", windows=windows, progress=False)
    apply_plan(quantized[1], plan, "gptq", windows=windows, progress=False, placement=Placement.cpu())
    a, b = (m.state_dict() for m in quantized)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sequential_onload_moves_each_layer_for_its_own_forward(arch):
    model = tiny_model(arch, n_layers=3)
    layers = decoder_layers(model)
    batch = random_windows(2, 16)
    with torch.inference_mode():
        reference = model(input_ids=batch).logits
    seen = []

    def spy(index: int):
        def hook(module, args):
            seen.append((index, [dtypes(layer) for layer in layers], model.get_output_embeddings().weight.dtype))

        return hook

    with sequential_onload(model, BF16) as progress, torch.inference_mode():
        handles = [layer.register_forward_pre_hook(spy(i)) for i, layer in enumerate(layers)]  # after onloading
        logits = model(input_ids=batch).logits
    for handle in handles:
        handle.remove()
    assert not progress.whole and progress.layer == 2 and logits.dtype == torch.bfloat16
    assert [i for i, _, _ in seen] == [0, 1, 2]
    for i, layer_dtypes, head in seen:
        assert layer_dtypes == [{torch.bfloat16} if j == i else {torch.float32} for j in range(3)]
        assert head == torch.bfloat16
    assert dtypes(model) == {torch.float32}
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    assert relative(logits, reference) < 0.05
    with sequential_onload(model, BF16, whole=True) as progress:
        assert progress.whole and dtypes(model) == {torch.bfloat16}
    assert dtypes(model) == {torch.float32}


def test_sequential_onload_leaves_a_bypassed_layer_home():
    model = tiny_model("llama", n_layers=3)
    layers = decoder_layers(model)
    seen = []
    with sequential_onload(model, BF16), bypassed(layers, {1}), torch.inference_mode():
        handle = layers[1].register_forward_pre_hook(lambda module, args: seen.append(dtypes(module)))
        model(input_ids=random_windows(1, 8))
    handle.remove()
    assert seen == [{torch.float32}]  # ppl_drop's pass-through forward reads no weights: nothing moved


def test_fisher_pass_recomputes_each_layer_on_the_device():
    model = tiny_model("llama", n_layers=2)
    windows = random_windows(2, 16)
    reference = output_fisher(model, windows, 1)
    placed = output_fisher(model, windows, 1, placement=BF16)
    for a, b in zip(placed, reference, strict=True):
        assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
        assert relative(a, b) < 0.15
    assert dtypes(model) == {torch.float32}


def test_fisher_pass_fails_if_the_recomputation_does_not_onload(monkeypatch):
    """The backward pass recomputes a checkpointed layer by calling its forward directly: no module hook
    fires then, so without its own onloading the layer would run home (here: float32 weights on bf16
    activations; on a GPU: CPU weights on CUDA activations)."""

    def plain(forward, layer=None, placement=None):
        return lambda *args, **kwargs: torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                                         **kwargs)

    monkeypatch.setattr(sensitivity_module, "_checkpointed", plain)
    with pytest.raises((RuntimeError, torch.utils.checkpoint.CheckpointError)):
        output_fisher(tiny_model("llama", n_layers=2), random_windows(2, 16), 1, placement=BF16)


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptaq"])
def test_apply_plan_on_a_placement_is_close_to_float32(method):
    model = tiny_model("qwen2", n_layers=2)  # qwen2: q/k/v have biases
    windows = random_windows(6, 24)  # 144 tokens: full-rank Hessians for the 128 MLP inputs
    placed = copy.deepcopy(model)
    plan = uniform_plan(layer_linear_shapes(model), 4, 32, method=method)
    calib = windows if method != "rtn" else None
    reference = apply_plan(model, plan, method, windows=calib, progress=False)
    homes = []

    def on_layer(step, outcome):
        homes.append(({t.dtype for t in step.layer.parameters()},
                      {b.dtype for n, b in step.layer.named_buffers() if n.endswith(".bias")}))

    outcomes = apply_plan(placed, plan, method, windows=calib, progress=False, placement=BF16, on_layer=on_layer)
    assert homes == [({torch.float32}, {torch.float32})] * 2  # on_layer sees the quantized layer home
    for a, b in zip(outcomes, reference, strict=True):
        assert math.isfinite(a.layer_error()) and abs(a.layer_error() - b.layer_error()) < 0.1 * b.layer_error()
    for module in placed.modules():
        if isinstance(module, QuantLinear):
            assert (module.qweight.dtype, module.scales.dtype) == (torch.int32, torch.float16)
            assert module.bias is None or module.bias.dtype == torch.float32
    nll, n = perplexity_on_windows(placed, windows)
    ref_nll, ref_n = perplexity_on_windows(model, windows)
    assert n == ref_n and abs(nll - ref_nll) / ref_nll < 0.02
    placed_nll, _ = perplexity_on_windows(placed, windows, placement=BF16)
    assert abs(placed_nll - nll) / nll < 0.02


def test_score_model_on_a_placement_is_close_to_float32():
    model = tiny_model("llama", n_layers=3)
    windows = random_windows(6, 24)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    names = ["sensitivity", "lim", "ppl_drop", "tie"]
    options = {"sensitivity": {"options": "2:32,4:32", "method": "gptq", "damage_windows": 4},
               "ppl_drop": {"windows": 4}, "tie": {"windows": 4, "max_offset": 1}}
    reference = score_model(model, names, windows, scorer_options=options, progress=False)
    placed = score_model(model, names, windows, scorer_options=options, progress=False, placement=BF16)
    for name in names:
        assert all(math.isfinite(v) for v in placed[name].scores), name
    for name in ("lim", "tie"):
        for a, b in zip(placed[name].scores, reference[name].scores, strict=True):
            assert abs(a - b) < 0.05 * abs(b), name
    assert sorted(placed["ppl_drop"].scores) == [0.0, 1.0, 2.0]
    for option, damage in placed["sensitivity"].option_damage.items():
        for a, b in zip(damage, reference["sensitivity"].option_damage[option], strict=True):
            assert abs(a - b) < 0.35 * b, option
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)


def test_bf16_model_compressed_on_a_placement_round_trips_through_a_checkpoint(tmp_path):
    # Built in bf16 as load_model(name, torch.bfloat16) builds it (`.to(bf16)` would also round the rotary
    # frequencies, which a loaded checkpoint recomputes in float32).
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", n_layers=2), dtype=torch.bfloat16).eval()
    windows = random_windows(6, 24)
    plan = uniform_plan(layer_linear_shapes(model), 4, 32, method="gptq")
    apply_plan(model, plan, "gptq", windows=windows, progress=False, placement=BF16)
    save_checkpoint(model, None, tmp_path / "ckpt", plan=resolve_methods(plan, "gptq"))
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["dtype"] == "bfloat16" and dtypes(ckpt.model) == {torch.bfloat16}
    with torch.inference_mode():
        assert torch.equal(ckpt.model(input_ids=windows[:2]).logits, model(input_ids=windows[:2]).logits)


def test_out_of_memory_names_the_layer_and_the_fix():
    with pytest.raises(LayerwiseError, match=r"out of GPU memory at decoder layer 12 \(scoring\); use --stream, "
                                             r"fewer --calib-windows, or a smaller --calib-len"):
        with oom_as_error("scoring", lambda: 12, Placement("cuda")):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU nothing is rewritten
        with oom_as_error("scoring", 12, Placement.cpu()):
            raise torch.cuda.OutOfMemoryError("out of memory")


def test_activation_policy(monkeypatch):
    cuda = Placement("cuda")
    assert activations_stay(10**15, Placement.cpu())
    assert not activations_stay(1, Placement("cuda", offload_activations=True))
    assert activations_stay(10**15, Placement("cuda", offload_activations=False))
    monkeypatch.setattr(placement_module, "free_device_memory", lambda device: 1000)
    assert activations_stay(700, cuda) and not activations_stay(900, cuda)
    assert not activations_stay(700, cuda, reserve_bytes=200)
    assert activations_stay([torch.zeros(100, dtype=torch.float32)], cuda)  # 400 bytes


def test_activations_hand_out_one_batch_at_a_time_on_the_device():
    stored = [torch.randn(2, 3), torch.randn(2, 3)]
    activations = Activations(stored, torch.device("meta"))
    assert len(activations) == 2 and activations[1].device.type == "meta"
    assert all(t.device.type == "meta" for t in activations)
    assert all(t.device.type == "cpu" for t in activations.stored)
    head = activations[:1]
    assert isinstance(head, Activations) and len(head) == 1 and head.stored[0] is stored[0]
    kept = Activations.keep(stored, BF16, offload=True)
    assert {t.dtype for t in kept.stored} == {torch.bfloat16} and kept.device == BF16.device


def test_streamed_model_on_a_placement_matches_the_model_in_memory(tmp_path):
    model = tiny_model("llama", n_layers=3)
    model.save_pretrained(tmp_path / "src")
    windows = random_windows(8, 16)
    streamed = StreamedModel(tmp_path / "src")  # float32 home, each layer read from the files for its step
    in_memory = score_model(model, ["lim"], windows, progress=False, placement=BF16)["lim"].scores
    from_files = score_model(streamed.model, ["lim"], windows, progress=False, weights=streamed,
                             placement=BF16)["lim"].scores
    assert from_files == in_memory
    plan = uniform_plan(layer_linear_shapes(model), 4, 32, method="gptq")
    written: dict[str, dict[str, torch.Tensor]] = {"files": {}, "memory": {}}

    def keep(into: str):
        def on_layer(step, outcome):
            written[into].update({f"{step.index}.{n}": t.clone() for n, t in step.layer.state_dict().items()})

        return on_layer

    apply_plan(streamed.model, plan, "gptq", windows=windows, progress=False, weights=streamed, placement=BF16,
               on_layer=keep("files"))
    apply_plan(model, plan, "gptq", windows=windows, progress=False, placement=BF16, on_layer=keep("memory"))
    assert written["files"].keys() == written["memory"].keys()
    assert all(torch.equal(written["files"][k], t) and t.device.type == "cpu" for k, t in written["memory"].items())
    assert all(p.device.type == "meta" for p in decoder_layers(streamed.model).parameters())


def test_streamed_bf16_model_writes_its_outer_tensors_in_bf16(tmp_path):
    model = tiny_model("llama", n_layers=2)
    model.save_pretrained(tmp_path / "src")
    streamed = StreamedModel(tmp_path / "src", torch.bfloat16)
    write_safetensors(tmp_path / "outer.safetensors", streamed.outer_tensors(), {"format": "pt"})
    outer = safetensors.torch.load_file(tmp_path / "outer.safetensors")
    embedding = outer["model.embed_tokens.weight"]
    assert embedding.dtype == torch.bfloat16 and torch.equal(embedding, model.model.embed_tokens.weight.bfloat16())
