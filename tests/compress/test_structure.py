"""Structural plans: choosing layers to prune, sub-layers to drop and layers to tie; plan bookkeeping."""

from __future__ import annotations

import itertools
import math

import pytest

from layerwise.core.budget import average_bits, layer_bits
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, LayerScores, Plan
from layerwise.planning.structure import StructureConfig, plan_structure, prune_layers, tie_runs

SHAPES = {"self_attn.q_proj": (8, 8), "self_attn.o_proj": (8, 8), "mlp.up_proj": (16, 8), "mlp.down_proj": (8, 16)}


def scores_of(values, **fields) -> LayerScores:
    return LayerScores("test", list(values), [dict(SHAPES) for _ in values], **fields)


def test_prune_takes_the_lowest_scores():
    scores = scores_of([5.0, 1.0, 3.0, 0.5, 4.0])
    assert prune_layers(scores, 2) == [1, 3]
    assert prune_layers(scores, 0) == []


def test_prune_block_takes_the_closest_block():
    scores = scores_of([1.0] * 6, block_distance={"2": [0.5, 0.4, 0.1, 0.3, 0.2]})
    assert prune_layers(scores, 2, block=True) == [2, 3]


def test_prune_block_without_distances_names_the_scorer():
    with pytest.raises(LayerwiseError, match="angular"):
        prune_layers(scores_of([1.0] * 4), 2, block=True)


def test_drops_never_empty_a_layer_or_reuse_one():
    scores = scores_of([1.0] * 4, module_scores={"attn": [0.1, 0.2, 0.9, 0.8], "mlp": [0.05, 0.9, 0.3, 0.7]})
    actions = plan_structure(4, StructureConfig(drop_attn=2, drop_mlp=1), sublayer_scores=scores)
    assert [a.drop for a in actions] == [["attn"], ["attn"], ["mlp"], []]


def brute_force_ties(damage: dict[str, list], n_layers: int, n: int) -> float:
    """Least total damage over every way to tie n layers into runs led by their first layer."""
    best = math.inf
    for tied in itertools.combinations(range(1, n_layers), n):
        total, ok = 0.0, True
        for j in tied:
            head = j
            while head in tied:
                head -= 1
            d = j - head
            if str(d) not in damage:
                ok = False
                break
            total += damage[str(d)][j]
        if ok:
            best = min(best, total)
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tie_runs_are_optimal(n):
    import random

    rng = random.Random(n)
    n_layers = 7
    damage = {str(d): [None if j < d else rng.random() for j in range(n_layers)] for d in (1, 2, 3)}
    scores = scores_of([1.0] * n_layers, tie_damage=damage)
    runs = tie_runs(scores, list(range(n_layers)), n)
    assert sum(len(r) - 1 for r in runs) == n
    assert all(r == list(range(r[0], r[-1] + 1)) for r in runs)
    total = sum(damage[str(j - r[0])][j] for r in runs for j in r[1:])
    assert total == pytest.approx(brute_force_ties(damage, n_layers, n))


def test_tie_runs_avoid_excluded_layers():
    damage = {"1": [None, 0.0, 0.0, 0.0, 0.0]}
    runs = tie_runs(scores_of([1.0] * 5, tie_damage=damage), [0, 1, 3, 4], 2)
    assert runs == [[0, 1], [3, 4]]


def test_plan_structure_orders_prune_then_drops_then_ties():
    scores = scores_of(
        [0.1, 5.0, 4.0, 3.0, 2.0, 1.0],
        module_scores={"attn": [0.0, 0.1, 1.0, 1.0, 1.0, 1.0], "mlp": [1.0] * 6},
        tie_damage={"1": [None, 0.5, 0.4, 0.01, 0.3, 0.2]},
    )
    actions = plan_structure(6, StructureConfig(prune=1, drop_attn=1, tie=1), prune_scores=scores,
                             sublayer_scores=scores, tie_scores=scores)
    assert actions[0].action == "prune"
    assert actions[1].drop == ["attn"]
    assert (actions[3].action, actions[3].tie_to) == ("tie", 2)


@pytest.mark.parametrize(
    "config, message",
    [
        (StructureConfig(prune=4), "at least one must stay"),
        (StructureConfig(prune=1, drop_attn=3), "keep its attention"),
        (StructureConfig(drop_attn=2, drop_mlp=3), "would prune it"),
        (StructureConfig(tie=4), "cannot tie 4"),
    ],
)
def test_impossible_counts_are_refused(config, message):
    with pytest.raises(LayerwiseError, match=message):
        config.check(4)


def test_negative_count_is_refused():
    with pytest.raises(LayerwiseError, match="non-negative"):
        StructureConfig(prune=-1)


def test_scorers_by_role():
    assert StructureConfig(prune=2).scorers("lim") == {"prune": "lim"}
    assert StructureConfig(prune=2, block=True).scorers() == {"prune": "angular"}
    assert StructureConfig(drop_mlp=1, tie=1).scorers() == {"sublayer": "sublayer", "tie": "tie"}


def test_budget_counts_nothing_for_removed_weights():
    quantized = LayerAction(0, "quantize", 4, 8)
    attn_dropped = LayerAction(0, "quantize", 4, 8, drop=["attn"])
    assert layer_bits(SHAPES, LayerAction(0, "prune")) == 0
    assert layer_bits(SHAPES, LayerAction(1, "tie", tie_to=0)) == 0
    mlp_only = {k: v for k, v in SHAPES.items() if k.startswith("mlp")}
    assert layer_bits(SHAPES, attn_dropped) == layer_bits(mlp_only, quantized)
    # The denominator stays the original weights: pruning half the layers halves the average.
    full = [LayerAction(i, "keep") for i in range(2)]
    half = [LayerAction(0, "keep"), LayerAction(1, "prune")]
    assert average_bits(half, [SHAPES, SHAPES]) == pytest.approx(average_bits(full, [SHAPES, SHAPES]) / 2)


def test_compact_and_expand_are_inverse():
    plan = Plan([LayerAction(0, "keep"), LayerAction(1, "prune"), LayerAction(2, "quantize", 4, 8),
                 LayerAction(3, "tie", tie_to=2), LayerAction(4, "keep", drop=["mlp"])])
    compact = plan.compact()
    assert [a.layer for a in compact.layers] == [0, 1, 2, 3]
    assert compact.layers[2].tie_to == 1 and compact.layers[3].drop == ["mlp"]
    assert plan.expand(compact).to_dict() == plan.to_dict()
    assert plan.kept_layers() == [0, 2, 3, 4] and plan.structural


@pytest.mark.parametrize(
    "layers, message",
    [
        ([LayerAction(0, "prune"), LayerAction(1, "prune")], "prunes every layer"),
        ([LayerAction(0, "prune"), LayerAction(1, "tie", tie_to=0)], "which is pruned"),
        ([LayerAction(0, "keep"), LayerAction(1, "tie", tie_to=5)], "does not exist"),
        ([LayerAction(0, "keep", drop=["mlp"]), LayerAction(1, "tie", tie_to=0)], "has its mlp dropped"),
        ([LayerAction(0, "keep", drop=["attn"]), LayerAction(1, "prune")], "attention of every layer"),
    ],
)
def test_bad_structural_plans_are_refused(layers, message):
    with pytest.raises(LayerwiseError, match=message):
        Plan(layers)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"action": "keep", "drop": ["ffn"]}, "cannot drop"),
        ({"action": "keep", "drop": ["attn", "mlp"]}, "use prune"),
        ({"action": "prune", "drop": ["attn"]}, "cannot also drop"),
        ({"action": "tie", "tie_to": 0}, "tied to itself"),
    ],
)
def test_bad_layer_actions_are_refused(fields, message):
    with pytest.raises(LayerwiseError, match=message):
        LayerAction(0, **fields)


def test_drop_round_trips_through_json():
    action = LayerAction(2, "quantize", 3, 8, drop=["mlp"])
    assert LayerAction.from_dict(action.to_dict()) == action
