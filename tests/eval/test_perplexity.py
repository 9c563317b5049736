"""Perplexity: checked against an independent NLL computation on a tiny random Llama.

The reference below computes log p(token) as ``logit - logsumexp(logits)`` in float64, one position at a
time, so it shares nothing with the implementation's batched float32 cross-entropy.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layerwise.core.errors import LayerwiseError
from layerwise.eval import DEFAULT_PROTOCOL, PerplexityProtocol, PerplexityResult, perplexity, perplexity_on_windows

VOCAB = 101


def tiny_llama(max_positions: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """``wN`` -> N for N < VOCAB - 1; anything else -> ``[UNK]`` (id VOCAB - 1)."""
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def reference_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()
            for t in range(window.shape[0] - 1):
                total += (torch.logsumexp(logits[t], dim=0) - logits[t, window[t + 1]]).item()
                count += 1
    return total, count


def random_words(n: int, seed: int = 1) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 1, (n,), generator=g).tolist())


def test_nll_matches_an_independent_computation():
    model = tiny_llama()
    windows = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    nll_sum, n_tokens = perplexity_on_windows(model, windows, batch_size=2)
    expected_sum, expected_count = reference_nll(model, windows)
    assert n_tokens == expected_count == 3 * 16
    assert nll_sum == pytest.approx(expected_sum, rel=1e-5)


def test_batch_size_does_not_change_the_result():
    model = tiny_llama()
    windows = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(3))
    one = perplexity_on_windows(model, windows, batch_size=1)
    five = perplexity_on_windows(model, windows, batch_size=5)
    assert one[1] == five[1] and one[0] == pytest.approx(five[0], rel=1e-5)


def test_perplexity_end_to_end_equals_exp_of_reference(tmp_path):
    corpus = tmp_path / "eval.txt"
    corpus.write_text(random_words(100), encoding="utf-8")
    protocol = PerplexityProtocol(name="tiny", corpus=str(corpus), max_tokens=70, window_len=16)
    model = tiny_llama()
    result = perplexity(model, word_tokenizer(), protocol, batch_size=3, progress=False)

    ids = word_tokenizer()(corpus.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 4 * 16]).view(4, 16)  # 70 tokens -> 4 whole windows of 16
    expected_sum, expected_count = reference_nll(model, windows)
    assert isinstance(result, PerplexityResult)
    assert (result.windows, result.tokens) == (4, expected_count) == (4, 60)
    assert result.nll == pytest.approx(expected_sum / expected_count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected_sum / expected_count), rel=1e-5)
    assert result.protocol == "tiny" and result.protocol_description == protocol.describe()
    assert result.seconds > 0
    assert set(result.to_dict()) == {
        "perplexity",
        "nll",
        "tokens",
        "windows",
        "protocol",
        "protocol_description",
        "seconds",
    }


def test_uniform_logits_give_perplexity_equal_to_vocab_size(tmp_path):
    corpus = tmp_path / "eval.txt"
    corpus.write_text(random_words(64), encoding="utf-8")
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1 / VOCAB for every token
    protocol = PerplexityProtocol(name="uniform", corpus=str(corpus), max_tokens=64, window_len=32)
    result = perplexity(model, word_tokenizer(), protocol, progress=False)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_window_longer_than_the_model_refuses():
    model = tiny_llama(max_positions=64)
    protocol = PerplexityProtocol(name="long", corpus="unused", max_tokens=256, window_len=128)
    with pytest.raises(LayerwiseError, match=r"128 tokens is longer than the model's 64 positions.*--window 64"):
        perplexity(model, word_tokenizer(), protocol, progress=False)


def test_training_mode_is_restored():
    model = tiny_llama().train()
    perplexity_on_windows(model, torch.zeros(1, 8, dtype=torch.long))
    assert model.training


@pytest.mark.parametrize("shape", [(8,), (2, 1)])
def test_bad_windows_shape(shape):
    with pytest.raises(LayerwiseError, match="windows must be"):
        perplexity_on_windows(tiny_llama(), torch.zeros(shape, dtype=torch.long))


def test_protocol_validation():
    with pytest.raises(LayerwiseError, match="less than one window"):
        PerplexityProtocol(name="bad", max_tokens=100, window_len=1024)
    assert PerplexityProtocol(name="p", max_tokens=3000, window_len=1024).n_windows == 2


def test_default_protocol():
    assert DEFAULT_PROTOCOL.name == "wiki-16k-w1024"
    assert (DEFAULT_PROTOCOL.corpus, DEFAULT_PROTOCOL.split) == ("wikipedia", "evaluation")
    assert (DEFAULT_PROTOCOL.max_tokens, DEFAULT_PROTOCOL.window_len) == (16384, 1024)
    assert DEFAULT_PROTOCOL.describe() == (
        "exp(mean token NLL) over the first 16,384 evaluation tokens of the wikipedia corpus "
        "in non-overlapping windows of 1024 tokens"
    )


@pytest.mark.integration
def test_default_model_loads_from_cache_and_has_sane_perplexity():
    from layerwise.model.loading import default_cache_path, load_model

    load_model("smollm2-135m")  # converts the GGUF on the very first use (about 25 s)
    assert (default_cache_path() / "model.safetensors").is_file()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10  # the cached safetensors copy, not the GGUF
    assert not model.training and model.dtype == torch.float32

    protocol = PerplexityProtocol(name="wiki-2k-w1024", max_tokens=2048, window_len=1024)
    result = perplexity(model, tokenizer, protocol, progress=False)
    assert (result.windows, result.tokens) == (2, 2046)
    assert 5 < result.perplexity < 100
