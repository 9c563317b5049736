"""Structural planning: which layers to prune, which sub-layers to drop, which layers to tie.

The choices read the scores of the structural scorers (layerwise.importance):

* prune n layers: the n lowest-scoring layers (`lim` = ShortGPT's Block Influence ranking, `ppl_drop`'s
  greedy removal order, ...), or, with `block`, the n consecutive layers whose input and output hidden
  states are closest in angular distance (`angular`; Gromov et al., 2024);
* drop n attention / n MLP sub-layers: the lowest `module_scores["attn"]` / `["mlp"]` of the `sublayer`
  scorer (LLM-Drop, He et al., 2024), never both sub-layers of one layer (that is pruning) and never
  every attention of the model;
* tie n layers: disjoint runs of adjacent layers (adjacent once the pruned ones are gone), each run
  sharing the weights of its first layer, with exactly n layers tied away and the least summed measured
  damage (`tie` scorer: running layer j with the weights of layer j - d). Solved exactly by dynamic
  programming over the layers.

Order: prune, then ties among the layers left, then drops among the layers neither tied nor
representatives (a tied layer shares all of its representative's modules, so runs stay clear of drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import SUBLAYERS, LayerAction, LayerScores

TIE_MODES = ("first", "average")
# Which scorer decides each structural choice by default.
DEFAULT_PRUNE_SCORER = "lim"  # measured: as good as angular up to 9 layers, far better at 10 (docs/RESULTS.md)
BLOCK_SCORER = "angular"
SUBLAYER_SCORER = "sublayer"
TIE_SCORER = "tie"


@dataclass(frozen=True)
class StructureConfig:
    """How many layers to prune, sub-layers to drop and layers to tie away.

    `block`: prune one contiguous block (needs `angular` scores) rather than the n lowest layers.
    `tie_mode`: a run of tied layers computes with the weights of its first layer (``first``) or with
    the average of its members' weights written into the first layer (``average``).
    """

    prune: int = 0
    block: bool = False
    drop_attn: int = 0
    drop_mlp: int = 0
    tie: int = 0
    tie_mode: str = "first"

    def __post_init__(self) -> None:
        for name in ("prune", "drop_attn", "drop_mlp", "tie"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise LayerwiseError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        if self.tie_mode not in TIE_MODES:
            raise LayerwiseError(f"unknown tie mode {self.tie_mode!r}; choose one of {', '.join(TIE_MODES)}")

    @property
    def empty(self) -> bool:
        return not (self.prune or self.drop_attn or self.drop_mlp or self.tie)

    def scorers(self, prune_scorer: str | None = None) -> dict[str, str]:
        """The scorer each structural choice reads, keyed by role (`plan_structure`'s ``<role>_scores``)."""
        roles = {}
        if self.prune:
            roles["prune"] = prune_scorer or (BLOCK_SCORER if self.block else DEFAULT_PRUNE_SCORER)
        if self.drop_attn or self.drop_mlp:
            roles["sublayer"] = SUBLAYER_SCORER
        if self.tie:
            roles["tie"] = TIE_SCORER
        return roles

    def check(self, n_layers: int) -> None:
        """Counts that cannot work on a model of `n_layers`, refused before any scoring."""
        if self.prune >= n_layers:
            raise LayerwiseError(
                f"cannot prune {self.prune} of {n_layers} layers; at least one must stay (give --prune < {n_layers})"
            )
        left = n_layers - self.prune
        if self.tie and self.tie >= left:
            raise LayerwiseError(
                f"cannot tie {self.tie} layers: {left} layers stay after pruning and each run of tied layers "
                f"keeps one (give --tie < {left})"
            )
        free = left - self.tie - (1 if self.tie else 0)  # neither tied nor (at least one) representative
        if self.drop_attn and self.drop_attn >= left - self.tie:
            raise LayerwiseError(
                f"cannot drop {self.drop_attn} attention sub-layers: {left - self.tie} layers compute after pruning "
                f"and tying, and at least one must keep its attention (give --drop-attn < {left - self.tie})"
            )
        if self.drop_attn + self.drop_mlp > free:
            raise LayerwiseError(
                f"cannot drop {self.drop_attn} attention and {self.drop_mlp} MLP sub-layers: {free} layers are "
                "left that are neither pruned nor tied, and dropping both sub-layers of one layer would prune it "
                "(lower the counts, or use --prune)"
            )


def _lowest(values: list[float], candidates: list[int], n: int) -> list[int]:
    return sorted(sorted(candidates, key=lambda i: (values[i], i))[:n])


def prune_layers(scores: LayerScores, n: int, block: bool = False) -> list[int]:
    """The n layers to prune: lowest scores, or the best contiguous block by angular distance."""
    if n == 0:
        return []
    if not block:
        return _lowest(scores.scores, list(range(scores.n_layers)), n)
    distances = scores.block_distance.get(str(n))
    if distances is None:
        raise LayerwiseError(
            f"pruning a block of {n} layers needs angular distances for blocks of {n}; scorer "
            f"{scores.scorer!r} measured none (use --scorer angular)"
        )
    start = min(range(len(distances)), key=lambda s: (distances[s], s))
    return list(range(start, start + n))


def drop_sublayers(scores: LayerScores, candidates: list[int], drop_attn: int, drop_mlp: int) -> dict[int, list[str]]:
    """Which sub-layers to drop, by layer: the lowest attention scores first, then the lowest MLP ones."""
    if not drop_attn and not drop_mlp:
        return {}
    missing = [s for s, n in zip(SUBLAYERS, (drop_attn, drop_mlp), strict=True) if n and s not in scores.module_scores]
    if missing:
        raise LayerwiseError(
            f"dropping {' and '.join(missing)} sub-layers needs per-sub-layer scores; scorer {scores.scorer!r} "
            "has none (use the sublayer scorer)"
        )
    drops: dict[int, list[str]] = {}
    for i in _lowest(scores.module_scores["attn"], candidates, drop_attn) if drop_attn else []:
        drops[i] = ["attn"]
    free = [i for i in candidates if i not in drops]
    for i in _lowest(scores.module_scores["mlp"], free, drop_mlp) if drop_mlp else []:
        drops[i] = ["mlp"]
    return drops


def tie_runs(scores: LayerScores, candidates: list[int], n: int) -> list[list[int]]:
    """Disjoint runs of adjacent candidate layers that tie away exactly n layers at the least damage.

    A run [a, ..., b] ties every member to a and costs the sum of damage(j, j - a); members must be
    consecutive layers and within the measured offsets. Exact DP over (layer, layers tied so far).
    """
    if n == 0:
        return []
    damage = scores.tie_damage
    if not damage:
        raise LayerwiseError(
            f"tying layers needs measured tie damage; scorer {scores.scorer!r} has none (use the tie scorer)"
        )
    max_offset = max(int(d) for d in damage)
    layers = sorted(candidates)

    def run_cost(first: int, last: int) -> float:
        """Damage of tying layers[first + 1 .. last] to layers[first] (positions in `layers`)."""
        total = 0.0
        for j in layers[first + 1 : last + 1]:
            offset = j - layers[first]
            value = damage[str(offset)][j] if offset <= max_offset else None
            if value is None or not math.isfinite(value):
                return math.inf
            total += value
        return total

    m = len(layers)
    # best[i][k]: least damage over the first i candidates with k of them tied away; start[i][k]: the
    # position where the run ending at candidate i - 1 starts.
    best = [[math.inf] * (n + 1) for _ in range(m + 1)]
    start = [[0] * (n + 1) for _ in range(m + 1)]
    best[0][0] = 0.0
    for i in range(1, m + 1):
        for k in range(n + 1):
            for a in range(max(0, i - 1 - max_offset), i):
                tied = i - 1 - a
                if tied > k:
                    continue
                cost = best[a][k - tied] + run_cost(a, i - 1)
                if cost < best[i][k]:
                    best[i][k], start[i][k] = cost, a
    if not math.isfinite(best[m][n]):
        raise LayerwiseError(
            f"cannot tie {n} layers: not enough adjacent layers with measured tie damage (offsets up to "
            f"{max_offset}); lower --tie"
        )
    runs, i, k = [], m, n
    while i > 0:
        a = start[i][k]
        if i - 1 > a:
            runs.append(layers[a:i])
        k -= i - 1 - a
        i = a
    return sorted(runs)


def plan_structure(
    n_layers: int,
    config: StructureConfig,
    *,
    prune_scores: LayerScores | None = None,
    sublayer_scores: LayerScores | None = None,
    tie_scores: LayerScores | None = None,
) -> list[LayerAction]:
    """Per-layer actions: prune / tie / keep (with drops); every other layer is `keep`, to be quantized later."""
    config.check(n_layers)
    for scores in (prune_scores, sublayer_scores, tie_scores):
        if scores is not None and scores.n_layers != n_layers:
            raise LayerwiseError(f"scores of {scores.n_layers} layers do not fit a model of {n_layers}")
    needed = {"prune": (config.prune, prune_scores), "drop": (config.drop_attn or config.drop_mlp, sublayer_scores),
              "tie": (config.tie, tie_scores)}
    for what, (count, scores) in needed.items():
        if count and scores is None:
            raise LayerwiseError(f"planning to {what} layers needs scores for it")
    pruned = prune_layers(prune_scores, config.prune, config.block) if prune_scores else []
    left = [i for i in range(n_layers) if i not in pruned]
    runs = tie_runs(tie_scores, left, config.tie) if tie_scores else []
    tied = {j: run[0] for run in runs for j in run[1:]}
    in_runs = {j for run in runs for j in run}
    free = [i for i in left if i not in in_runs]
    drops = drop_sublayers(sublayer_scores, free, config.drop_attn, config.drop_mlp) if sublayer_scores else {}
    actions = []
    for i in range(n_layers):
        if i in pruned:
            actions.append(LayerAction(i, "prune"))
        elif i in tied:
            actions.append(LayerAction(i, "tie", tie_to=tied[i]))
        else:
            actions.append(LayerAction(i, "keep", drop=drops.get(i, [])))
    return actions
