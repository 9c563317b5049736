"""Shared fixtures: tiny random decoder-only models of every supported architecture, built locally."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: CPU runs interpret kernels

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gpt2", "opt", "phi3")
VOCAB = 96
HIDDEN = 64


def tiny_config(arch: str, n_layers: int = 4):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=8)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, sliding_window_pattern=2)
    if arch == "phi3":
        return Phi3Config(**common, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=n_layers, n_head=4, n_positions=256)
    if arch == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=n_layers,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN)
    raise ValueError(arch)


def tiny_model(arch: str, n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers), dtype=torch.float32)
    return model.eval()


def random_windows(n: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=generator)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on Python's own docs: no hub, a few hundred tokens."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:60], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny llama with a real (tiny) tokenizer saved as a plain HF directory, for CLI and API tests."""
    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", n_layers=4)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def interrupt_streaming_at(monkeypatch, index: int) -> None:
    """Make a streamed compression raise KeyboardInterrupt (as Ctrl-C would) when its quantization pass
    loads decoder layer `index`; `monkeypatch.undo()` or `record_quantized_loads` ends it."""
    from layerwise.engine.streaming import StreamedModel

    real = _real_streamed_load()

    def load(self, i):
        if self.quantizing and i == index:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(StreamedModel, "load", load)


def record_quantized_loads(monkeypatch) -> list[int]:
    """Restore streaming's own layer loading and list the layers its quantization passes load from now on."""
    from layerwise.engine.streaming import StreamedModel

    real, loaded = _real_streamed_load(), []

    def load(self, i):
        if self.quantizing:
            loaded.append(i)
        return real(self, i)

    monkeypatch.setattr(StreamedModel, "load", load)
    return loaded


@functools.cache
def _real_streamed_load():
    """`StreamedModel.load` as layerwise defines it (first read before any test patches it)."""
    from layerwise.engine.streaming import StreamedModel

    return StreamedModel.load
