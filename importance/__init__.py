"""Layer importance scorers. Each registers itself in `SCORERS` by name; higher = more important."""

from layerwise.importance import angular, lim, ppl_drop, sensitivity, sublayer, tie, zd  # noqa: F401  (registration)
from layerwise.importance.base import SCORERS, LayerScorer, score_model

__all__ = ["SCORERS", "LayerScorer", "score_model"]
