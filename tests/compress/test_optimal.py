import itertools
import random

import pytest
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.api import make_plan
from layerwise.core.budget import average_bits
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerScores, QuantSpec, parse_options
from layerwise.planning.optimal import solve

SHAPES = {"q": (64, 64), "up": (128, 64), "down": (64, 128)}
OPTIONS = "2:32,3:32,4:32,8:32"


def brute_force(costs, damages, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][o] for i, o in enumerate(choice))
        damage = sum(damages[i][o] for i, o in enumerate(choice))
        if cost <= budget and (best is None or (damage, cost) < best[:2]):
            best = (damage, cost, list(choice))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_solver_is_exact(seed):
    rng = random.Random(seed)
    costs = [[rng.randint(1, 20) for _ in range(3)] for _ in range(5)]
    damages = [[rng.random() for _ in range(3)] for _ in range(5)]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    choice, damage, cost = solve(costs, damages, budget)
    expected_damage, _, _ = brute_force(costs, damages, budget)
    assert damage == pytest.approx(expected_damage) and cost <= budget
    assert sum(costs[i][o] for i, o in enumerate(choice)) == cost


def scores_with_damage(damage_by_option, n_layers=4):
    return LayerScores("sensitivity", [0.0] * n_layers, [dict(SHAPES)] * n_layers, option_damage=damage_by_option)


def test_optimal_spends_bits_where_damage_is_measured():
    # Layer 2 is by far the most damaged at low bits: the planner must keep it wide.
    damage = {
        "2:32:rtn": [1.0, 1.0, 50.0, 1.0],
        "4:32:rtn": [0.1, 0.1, 5.0, 0.1],
        "8:32:rtn": [0.0, 0.0, 0.0, 0.0],
    }
    scores = scores_with_damage(damage)
    plan = make_plan(scores, 4.5, planner="optimal")
    assert plan.bits_per_layer()[2] == 8
    assert plan.avg_bits <= 4.5
    assert average_bits(plan.layers, scores.linear_shapes) == pytest.approx(plan.avg_bits)


@pytest.mark.parametrize(
    ("bits", "options", "match"),
    [
        (2.0, None, "below the cheapest option"),
        (12.0, None, "above the richest option"),
        (4.0, "3:64", "were not measured"),
    ],
)
def test_unreachable_budgets_and_unmeasured_options(bits, options, match):
    scores = scores_with_damage({o.option(): [0.1] * 4 for o in parse_options(OPTIONS)})
    with pytest.raises(LayerwiseError, match=match):
        make_plan(scores, bits, planner="optimal", options=options)


def test_optimal_needs_option_damage():
    with pytest.raises(LayerwiseError, match="scorer sensitivity"):
        make_plan(LayerScores("lim", [0.0] * 4, [dict(SHAPES)] * 4), 4.0, planner="optimal")
    with pytest.raises(LayerwiseError, match="use --scorer sensitivity"):
        layerwise.compress(tiny_model("llama", 2), 4.0, scorer="lim", planner="optimal", calib=random_windows(2, 8),
                           progress=False)


def test_option_parsing():
    assert QuantSpec.parse_option("4:64:gptq:sym") == QuantSpec(4, 64, "gptq", True)
    assert QuantSpec.parse_option("3", default_method="gptq") == QuantSpec(3, 128, "gptq")
    for bad in ("x:128", "4:128:rtn:wide", "5:128"):
        with pytest.raises(LayerwiseError):
            QuantSpec.parse_option(bad)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sensitivity_optimal_compress_end_to_end(method):
    torch.manual_seed(0)
    model = tiny_model("llama", n_layers=4)
    ids = random_windows(1, 16, seed=7)
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    result = layerwise.compress(model, 4.0, scorer="sensitivity", planner="optimal", method=method,
                                options=OPTIONS, calib=random_windows(8, 32), progress=False)
    damage = result.scores.option_damage
    assert set(damage) == {o.option() for o in parse_options(OPTIONS, method)}
    # Damage falls as bits grow, for every layer.
    for layer in range(4):
        values = [damage[f"{b}:32:{method}"][layer] for b in (2, 3, 4, 8)]
        assert values == sorted(values, reverse=True) and values[-1] >= 0
    assert result.plan.avg_bits <= 4.0 and result.plan.made_by["planner"] == "optimal"
    with torch.inference_mode():
        rel = (model(input_ids=ids).logits - reference).norm() / reference.norm()
    assert rel < 0.5


def test_gptq_beats_rtn_on_the_same_uniform_plan():
    ids = random_windows(2, 16, seed=11)
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama", n_layers=3)
        with torch.inference_mode():
            reference = model(input_ids=ids).logits
        layerwise.compress(model, uniform=3, group_size=32, method=method, calib=random_windows(16, 32),
                           progress=False)
        with torch.inference_mode():
            errors[method] = float((model(input_ids=ids).logits - reference).norm() / reference.norm())
    assert errors["gptq"] < errors["rtn"]


def test_gptq_warns_on_too_few_calibration_tokens():
    model = tiny_model("llama", n_layers=2)
    with pytest.warns(UserWarning, match="calibration tokens"):
        layerwise.compress(model, uniform=4, group_size=32, method="gptq", calib=random_windows(1, 8),
                           progress=False)
