"""The whole path on the real default model (SmolLM2-135M-Instruct), kept small enough for CI."""

import pytest
import safetensors.torch
import torch
from export_helpers import TOLERANCE, decompressor_body, logits_in_subprocess, relative_difference

import layerwise
from layerwise.core.types import QuantSpec
from layerwise.eval import PerplexityProtocol, perplexity
from layerwise.model.loading import load_model
from layerwise.output.export import export_checkpoint

pytestmark = pytest.mark.integration

SMALL = PerplexityProtocol("wiki-2k-w512", max_tokens=2048, window_len=512)


def test_compress_to_3_25_bits_reload_and_evaluate(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    ppl_before = perplexity(model, tokenizer, SMALL, progress=False).perplexity
    # The defaults: measured sensitivity, the optimal planner, GPTAQ; no rotation, since SmolLM2's head is
    # tied to its embedding (auto rotates only where untying costs nothing).
    result = layerwise.compress(model, 3.25, tokenizer=tokenizer, calib_windows=8, calib_len=256, progress=False)
    assert result.scores.scorer == "sensitivity" and result.plan.made_by["planner"] == "optimal"
    assert all(a.method == "gptaq" for a in result.plan.layers) and result.rotation is None
    assert len(result.plan.layers) == 30 and 3.0 < result.report.avg_bits <= 3.25
    # The plan is the least damaging one the scores allow: no single-layer swap to another measured
    # option that still fits the budget lowers the predicted damage.
    damage = result.scores.option_damage
    shapes = result.scores.linear_shapes

    def average_bits(options: list[str]) -> float:
        specs = [QuantSpec.parse_option(o) for o in options]
        stored = sum(spec.fit(shape[1]).storage_bits(*shape) for spec, layer in zip(specs, shapes, strict=True)
                     for shape in layer.values())
        return stored / sum(o * i for layer in shapes for o, i in layer.values())

    chosen = [a.spec().option() for a in result.plan.layers]
    total = sum(damage[o][i] for i, o in enumerate(chosen))
    for i, option in enumerate(chosen):
        for other in damage:
            if damage[other][i] < damage[option][i]:
                swapped = [*chosen[:i], other, *chosen[i + 1:]]
                assert average_bits(swapped) > 3.25 or sum(
                    damage[o][j] for j, o in enumerate(swapped)) >= total
    ppl_after = perplexity(result.model, tokenizer, SMALL, progress=False).perplexity
    assert ppl_after > ppl_before  # 3-bit layers cost quality; the number is measured, not assumed

    layerwise.save(result, tmp_path / "ckpt")
    ckpt = layerwise.load(tmp_path / "ckpt")
    ids = tokenizer("The history of the printing press", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(ckpt.model(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert perplexity(ckpt.model, ckpt.tokenizer, SMALL, progress=False).perplexity == pytest.approx(ppl_after)
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert size < 0.5 * sum(p.numel() * 4 for p in load_model("smollm2-135m")[0].parameters())

    # The checkpoint exports to compressed-tensors (group 128 became 64 on the 576-wide inputs), takes on
    # disk what the budget counted, and compressed-tensors' own decompressor, in a process without layerwise,
    # computes the same logits.
    assert "group 128 -> 64 for 576-wide inputs" in " ".join(result.report.group_fits)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "ct", "compressed-tensors")
    stored = safetensors.torch.load_file(tmp_path / "ct" / "model.safetensors")
    decoder_bytes = sum(t.numel() * t.element_size() for k, t in stored.items()
                        if ".layers." in k and ".weight_" in k and not k.endswith("weight_shape"))
    assert decoder_bytes * 8 / result.report.decoder_weights <= 3.25
    exported = logits_in_subprocess(tmp_path, decompressor_body(tmp_path / "ct"), ids.tolist())
    assert relative_difference(exported, result.model(input_ids=ids).logits.detach()) < TOLERANCE
