"""The whole path on the real default model (SmolLM2-135M-Instruct), kept small enough for CI."""

import pytest
import torch

import layerwise
from layerwise.eval import PerplexityProtocol, perplexity
from layerwise.loading import load_model

pytestmark = pytest.mark.integration

SMALL = PerplexityProtocol("wiki-2k-w512", max_tokens=2048, window_len=512)


def test_compress_to_3_25_bits_reload_and_evaluate(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    ppl_before = perplexity(model, tokenizer, SMALL, progress=False).perplexity
    result = layerwise.compress(model, 3.25, tokenizer=tokenizer, calib_windows=8, calib_len=256, progress=False)
    plan_bits = result.plan.bits_per_layer()
    assert len(plan_bits) == 30 and set(plan_bits) == {2, 4}
    assert 3.0 < result.report.avg_bits <= 3.25
    # LIM ranks layers: the layers kept at 4 bits are the highest scored ones.
    scores = result.scores.scores
    assert min(scores[i] for i, b in enumerate(plan_bits) if b == 4) >= max(
        scores[i] for i, b in enumerate(plan_bits) if b == 2
    )
    ppl_after = perplexity(result.model, tokenizer, SMALL, progress=False).perplexity
    assert ppl_after > ppl_before  # 2-bit RTN layers cost quality; the number is measured, not assumed

    layerwise.save(result, tmp_path / "ckpt")
    ckpt = layerwise.load(tmp_path / "ckpt")
    ids = tokenizer("The history of the printing press", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(ckpt.model(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert perplexity(ckpt.model, ckpt.tokenizer, SMALL, progress=False).perplexity == pytest.approx(ppl_after)
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert size < 0.5 * sum(p.numel() * 4 for p in load_model("smollm2-135m")[0].parameters())
