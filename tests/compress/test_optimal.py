import itertools
import random

import pytest
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.api import make_plan
from layerwise.core.budget import average_bits
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerScores, QuantSpec, module_units, parse_options, unit_name
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


# --- one option per module ----------------------------------------------------------------------------------

LLAMA_SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                "mlp.down_proj": (64, 128)}


def test_module_units_group_what_each_granularity_says():
    names = list(LLAMA_SHAPES)
    assert module_units(names, "layer") == [tuple(names)]
    assert module_units(names, "module") == [(n,) for n in names]
    assert module_units(names, "fused") == [tuple(names[:3]), (names[3],), tuple(names[4:6]), (names[6],)]
    # OPT lists k, v, q: the fused unit keeps the layer's order; GPT-2's c_attn is fused already.
    opt = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"]
    assert module_units(opt, "fused") == [tuple(opt[:3]), (opt[3],), (opt[4],), (opt[5],)]
    assert module_units(["attn.c_attn", "attn.c_proj"], "fused") == [("attn.c_attn",), ("attn.c_proj",)]
    with pytest.raises(LayerwiseError, match="unknown granularity 'tensor'; choose one of layer, module, fused"):
        module_units(names, "tensor")


def module_scores(seed, n_layers=4, options=OPTIONS, granularity="module"):
    """Scores with random per-unit damages falling with the bits, and per-layer damages their sums."""
    rng = random.Random(seed)
    labels = [o.option() for o in parse_options(options)]
    damage = []
    for _ in range(n_layers):
        units = {}
        for unit in module_units(list(LLAMA_SHAPES), granularity):
            base = rng.random() * 10 ** rng.uniform(-2, 1)
            units[unit_name(unit)] = {label: base * 4.0 ** -k for k, label in enumerate(labels)}
        damage.append(units)
    by_option = {label: [sum(u[label] for u in layer.values()) for layer in damage] for label in labels}
    return LayerScores("sensitivity", [0.0] * n_layers, [dict(LLAMA_SHAPES)] * n_layers, option_damage=by_option,
                       module_damage=damage)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [2.6, 3.3, 4.4])
def test_a_plan_per_module_is_never_worse_than_per_layer(seed, bits):
    """Every per-layer plan is also a per-module plan, so the optimum over modules predicts no more damage;
    the plan's overrides give each module its option, and the budget counts them."""
    scores = module_scores(seed)
    per_module = make_plan(scores, bits, planner="optimal")
    per_layer = make_plan(scores, bits, planner="optimal", granularity="layer")
    assert per_module.made_by["granularity"] == "module" and "granularity" not in per_layer.made_by
    assert per_module.made_by["predicted_damage"] <= per_layer.made_by["predicted_damage"] + 1e-12
    assert per_module.avg_bits <= bits and average_bits(per_module.layers, scores.linear_shapes) == pytest.approx(
        per_module.avg_bits)
    assert not any(a.overrides for a in per_layer.layers)
    # The predicted damage is the sum of each module's measured damage at the option the plan gives it.
    predicted = sum(scores.module_damage[a.layer][name][a.module_spec(name).option()]
                    for a in per_module.layers for name in LLAMA_SHAPES)
    assert predicted == pytest.approx(per_module.made_by["predicted_damage"])


def test_the_damaged_module_gets_the_bits():
    """v_proj is the one module that suffers at low width: it gets 8 bits in every layer, as an override."""
    labels = [o.option() for o in parse_options(OPTIONS)]
    damage = [{name: {label: (100.0 if name == "self_attn.v_proj" and k < 3 else 1.0) * 2.0 ** -k
                      for k, label in enumerate(labels)} for name in LLAMA_SHAPES} for _ in range(4)]
    by_option = {label: [sum(u[label] for u in layer.values()) for layer in damage] for label in labels}
    scores = LayerScores("sensitivity", [0.0] * 4, [dict(LLAMA_SHAPES)] * 4, option_damage=by_option,
                         module_damage=damage)
    plan = make_plan(scores, 3.0, planner="optimal")
    for action in plan.layers:
        assert action.module_spec("self_attn.v_proj").bits == 8
        assert action.bits < 8 and "self_attn.v_proj" in action.overrides


def test_fused_plans_keep_vllm_sets_together():
    """Planned per fused set from damage measured per module (the parts' damages summed), q/k/v and gate/up
    share one spec in every layer."""
    scores = module_scores(0)
    plan = make_plan(scores, 3.3, planner="optimal", granularity="fused")
    assert plan.made_by["granularity"] == "fused"
    for action in plan.layers:
        assert len({action.module_spec(f"self_attn.{p}_proj") for p in "qkv"}) == 1
        assert action.module_spec("mlp.gate_proj") == action.module_spec("mlp.up_proj")
    fused = module_scores(0, granularity="fused")
    assert make_plan(fused, 3.3, planner="optimal").made_by["granularity"] == "fused"


def test_a_granularity_the_scores_cannot_give_is_refused():
    with pytest.raises(LayerwiseError, match="measured per layer; score with granularity module"):
        make_plan(scores_with_damage({o.option(): [0.1] * 4 for o in parse_options(OPTIONS)}), 4.0,
                  planner="optimal", granularity="module")
    with pytest.raises(LayerwiseError, match=r"plans self_attn.q_proj of layer 0 as one unit, and the scores "
                                             r"measured self_attn.q_proj\+self_attn.k_proj\+self_attn.v_proj"):
        make_plan(module_scores(0, granularity="fused"), 4.0, planner="optimal", granularity="module")
    with pytest.raises(LayerwiseError, match="unknown granularity 'rows'"):
        make_plan(module_scores(0), 4.0, planner="optimal", granularity="rows")


def test_module_damage_round_trips_and_follows_subsets(tmp_path):
    scores = module_scores(1)
    scores.save(tmp_path / "s.json")
    loaded = LayerScores.load(tmp_path / "s.json")
    assert loaded.module_damage == scores.module_damage
    assert loaded.subset([3, 1]).module_damage == [scores.module_damage[3], scores.module_damage[1]]
    with pytest.raises(LayerwiseError, match="scores has 4 layers but module_damage has 1"):
        LayerScores("s", [0.0] * 4, [dict(LLAMA_SHAPES)] * 4, module_damage=scores.module_damage[:1])
