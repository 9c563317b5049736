"""Evaluation of (compressed) models: perplexity under a fixed, named protocol."""

from layerwise.eval.perplexity import (
    DEFAULT_PROTOCOL,
    PerplexityProtocol,
    PerplexityResult,
    perplexity,
    perplexity_on_windows,
)

__all__ = [
    "DEFAULT_PROTOCOL",
    "PerplexityProtocol",
    "PerplexityResult",
    "perplexity",
    "perplexity_on_windows",
]
