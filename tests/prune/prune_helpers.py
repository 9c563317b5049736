"""Checks shared by the prune tests: cached vs uncached decoding, logits, and a model fingerprint."""

from __future__ import annotations

import torch
from conftest import random_windows
from torch import nn

from layerwise.model.adapter import decoder_layers
from layerwise.output.checkpoint import unique_state_dict


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def assert_cache_consistent(model: nn.Module) -> None:
    """Greedy decoding with and without the KV cache gives the same tokens, and stepping through the
    cache one token at a time gives the logits of one full forward (past the sliding window of 8)."""
    ids = random_windows(2, 10, seed=3)
    with torch.inference_mode():
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached), (cached, uncached)

    ids = random_windows(2, 16, seed=4)
    full = logits(model, ids)
    with torch.inference_mode():
        out = model(input_ids=ids[:, :10], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(10, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    for slot in range(len(decoder_layers(model))):
        assert cache.get_seq_length(slot) == ids.shape[1], slot


def unique_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_state_dict(model).values())


def fingerprint(model: nn.Module) -> tuple:
    """Everything a refused edit must leave alone: module tree (by identity), tensors, layer indices, config."""
    modules = tuple((name, id(module)) for name, module in model.named_modules())
    state = model.state_dict(keep_vars=True)
    tensors = tuple((name, id(t), t.data_ptr(), float(t.detach().double().sum())) for name, t in state.items())
    indices = tuple(
        (name, module.layer_idx) for name, module in model.named_modules() if hasattr(module, "layer_idx")
    )
    return modules, tensors, indices, model.config.to_json_string()
