"""Perplexity under a named, fixed protocol, so numbers from different runs and models are comparable.

A perplexity means little without its protocol (which text, how many tokens, what context length), so
every result carries the protocol's name and a sentence describing it. The default, ``wiki-16k-w1024``,
is the one layerwise reports everywhere unless told otherwise.

Each window is scored on its own: position ``t`` predicts token ``t + 1``, so a window of ``L`` tokens
contributes ``L - 1`` predicted tokens and the first token of each window is context only. Losses are
summed in float32 (whatever the model's dtype) and accumulated in Python floats (double precision). Under
a torch.distributed group (`layerwise.core.dist`) each rank scores its share of the windows and the sums
are added in rank order.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.data.corpora import load_text, token_windows
from layerwise.model.layer_calls import nll_sum, shifted_targets
from layerwise.model.placement import Placement, sequential_onload


@dataclass(frozen=True)
class PerplexityProtocol:
    """Which text to score and how: `max_tokens` tokens (None: all) of `corpus`'s `split` in windows.

    `max_tokens` is rounded down to whole windows; `corpus` is a built-in corpus name or a text file.
    """

    name: str
    corpus: str = "wikipedia"
    split: str = "evaluation"
    max_tokens: int | None = 16384
    window_len: int = 1024

    def __post_init__(self) -> None:
        if self.window_len < 2:
            raise LayerwiseError(f"protocol {self.name}: window length must be at least 2, got {self.window_len}")
        if self.max_tokens is not None and self.max_tokens < self.window_len:
            raise LayerwiseError(
                f"protocol {self.name}: max_tokens {self.max_tokens} is less than one window of "
                f"{self.window_len} tokens; raise max_tokens or shorten the window"
            )

    @property
    def n_windows(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens // self.window_len

    def describe(self) -> str:
        amount = "all" if self.max_tokens is None else f"the first {self.max_tokens:,}"
        return (
            f"exp(mean token NLL) over {amount} {self.split} tokens of the {self.corpus} corpus "
            f"in non-overlapping windows of {self.window_len} tokens"
        )


DEFAULT_PROTOCOL = PerplexityProtocol(name="wiki-16k-w1024")


@dataclass
class PerplexityResult:
    """One measurement. `nll` is the mean negative log-likelihood per predicted token, in nats."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    protocol: str
    protocol_description: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(
    model,
    tokenizer,
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
    batch_size: int = 1,
    progress: bool = True,
    *,
    placement: Placement | None = None,
) -> PerplexityResult:
    """Perplexity of `model` under `protocol`, on whatever device the model is on, or with a `placement`
    on its device in its dtype, one decoder layer at a time unless the model fits (`sequential_onload`)."""
    start = time.perf_counter()
    check_context_length(model, protocol.window_len)
    text = load_text(protocol.corpus, protocol.split)
    windows = token_windows(tokenizer, text, protocol.n_windows, protocol.window_len)
    # Under a process group each rank scores its share of the windows; every batch's sum is then added exactly
    # over the ranks' batches, which gives one process's bits.
    per_batch = batch_nlls(
        model, dist.shard(windows), batch_size=batch_size, progress=progress and dist.is_main(),
        desc=f"perplexity ({protocol.name})", placement=placement,
    )
    nll_sum, tokens = dist.exact_sums([[nll, float(n)] for nll, n in per_batch], 2)
    n_tokens = int(tokens)
    nll = nll_sum / n_tokens
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=n_tokens,
        windows=windows.shape[0],
        protocol=protocol.name,
        protocol_description=protocol.describe(),
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def perplexity_on_windows(
    model,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
    *,
    placement: Placement | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) over all windows, and the number of tokens predicted.

    `windows` is a LongTensor ``[n, L]``; each window is scored independently (no state carried over).
    The model is put in eval mode for the call (dropout would make the number random) and restored after.
    With a `placement` the forwards run on its device in its dtype (`layerwise.model.placement.sequential_onload`).
    """
    per_batch = batch_nlls(model, windows, batch_size, progress, desc, placement=placement)
    return math.fsum(nll for nll, _ in per_batch), sum(n for _, n in per_batch)


def batch_nlls(
    model,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
    *,
    placement: Placement | None = None,
) -> list[tuple[float, int]]:
    """`perplexity_on_windows` per batch of `batch_size` windows: its summed NLL and its tokens predicted."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise LayerwiseError(f"windows must be a [n, L] tensor with L >= 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise LayerwiseError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device if placement is None else placement.device
    was_training = model.training
    model.eval()
    per_batch: list[tuple[float, int]] = []
    try:
        with tqdm(total=windows.shape[0], desc=desc, unit="window", disable=not progress) as bar, \
                sequential_onload(model, placement, what=desc):
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll = nll_sum(logits, shifted_targets(batch)).item()
                per_batch.append((nll, batch.shape[0] * (batch.shape[1] - 1)))
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return per_batch


def check_context_length(model, window_len: int) -> None:
    """Refuse windows longer than the model's position table: the result would be garbage, not an error."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and window_len > limit:
        raise LayerwiseError(
            f"window of {window_len} tokens is longer than the model's {limit} positions; "
            f"use a window of at most {limit} tokens (--window {limit})"
        )
