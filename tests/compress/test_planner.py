import json

import pytest

from layerwise.api import make_plan
from layerwise.core.budget import average_bits, group_fits, layer_bits
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, LayerScores, Plan, QuantSpec, fitted_group_size

SHAPES = {"q": (576, 576), "k": (192, 576), "up": (1536, 576), "down": (576, 1536)}


def scores_for(values):
    return LayerScores("lim", list(values), [dict(SHAPES) for _ in values])


def test_storage_bits_include_scale_and_zero_overhead():
    # 4-bit, group 128, asymmetric: a fp16 scale and a 4-bit zero per group, 4 + (16 + 4) / 128 bits per weight.
    assert QuantSpec(4, 128).storage_bits(256, 1024) / (256 * 1024) == pytest.approx(4 + 20 / 128)
    assert QuantSpec(4, 128, sym=True).storage_bits(256, 1024) / (256 * 1024) == pytest.approx(4.125)
    # Zero points are packed down each group's column, padded to whole words: 3 rows of 3-bit zeros take a word.
    assert QuantSpec(3, 64).storage_bits(3, 128) == 3 * (12 * 32 + 2 * 16) + 2 * 32
    # 576 columns in groups of 128 as written: five groups, the last one half full (checkpoint format 1) ...
    assert QuantSpec(3, 128).n_groups(576) == 5
    # ... but modules are quantized with the group fitted to their width: 64 for 576-wide inputs.
    assert QuantSpec(3, 128).fit(576) == QuantSpec(3, 64) and QuantSpec(3, 128).fit(1536).group_size == 128


@pytest.mark.parametrize(("group", "width", "fitted"), [
    (128, 576, 64), (256, 576, 64), (128, 4096, 128), (96, 576, 96), (128, 100, 128), (200, 100, 200),
    (64, 96, 32), (128, 96, 128), (100, 1001, 1001), (64, 48, 64), (256, 768, 256), (512, 1536, 512), (1024, 1536, 512),
])
def test_group_sizes_are_fitted_to_the_input_width(group, width, fitted):
    """The group itself when it divides the width or covers the row; else the largest of 512 ... 32 below it
    that divides the width; else one group per row."""
    assert fitted_group_size(group, width) == fitted
    assert width % fitted == 0 or fitted >= width


def test_the_report_says_where_groups_were_fitted():
    scores = scores_for([0.1 * i for i in range(3)])
    plan = make_plan(scores, 3.25, high=4, low=2, group_size=128)
    lines = group_fits(plan, scores.linear_shapes)
    assert lines == ["group 128 -> 64 for 576-wide inputs (q, k, up; 3 layers)"]


def test_lwq_meets_budget_without_exceeding_it_and_is_closest():
    scores = scores_for([0.1 * i for i in range(10)])
    plan = make_plan(scores, 3.25, high=4, low=2, group_size=128)
    achieved = average_bits(plan.layers, scores.linear_shapes)
    assert achieved <= 3.25 and plan.avg_bits == pytest.approx(achieved)
    n_high = sum(b == 4 for b in plan.bits_per_layer())
    one_more = [LayerAction(i, "quantize", 4 if i < n_high + 1 else 2, 128) for i in range(10)]
    assert average_bits(one_more, scores.linear_shapes) > 3.25
    # The most important layers (highest score) get the high width.
    assert {i for i, b in enumerate(plan.bits_per_layer()) if b == 4} == set(range(10 - n_high, 10))


def test_orders_reverse_and_random():
    scores = scores_for([0.1 * i for i in range(10)])
    plan = make_plan(scores, 3.0, order="reverse")
    high = {i for i, b in enumerate(plan.bits_per_layer()) if b == 4}
    assert high == set(range(len(high)))
    a = make_plan(scores, 3.0, order="random", seed=1).bits_per_layer()
    b = make_plan(scores, 3.0, order="random", seed=1).bits_per_layer()
    c = [make_plan(scores, 3.0, order="random", seed=s).bits_per_layer() for s in range(2, 6)]
    assert a == b and any(a != x for x in c)


def test_n_low_puts_exactly_that_many_layers_low():
    plan = make_plan(scores_for(range(8)), None, n_low=2, high=8, low=4)
    assert plan.bits_per_layer() == [4, 4, 8, 8, 8, 8, 8, 8]


@pytest.mark.parametrize(
    ("bits", "high", "low", "match"),
    [(1.5, 4, 2, "below what 2-bit"), (4.5, 4, 2, "above the high width"), (3.0, 2, 4, "must be larger")],
)
def test_unreachable_budgets_are_refused(bits, high, low, match):
    with pytest.raises(LayerwiseError, match=match):
        make_plan(scores_for(range(4)), bits, high=high, low=low)


def test_plan_json_round_trip_and_edit(tmp_path):
    plan = make_plan(scores_for(range(6)), 3.0)
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    data["layers"][0]["bits"] = 8
    data["layers"][1]["overrides"] = {"down": {"bits": 8, "group_size": 64}}
    path.write_text(json.dumps(data))
    edited = Plan.load(path)
    assert edited.layers[0].bits == 8 and edited.layers[1].module_spec("down") == QuantSpec(8, 64)
    assert layer_bits(SHAPES, edited.layers[1]) > layer_bits(SHAPES, plan.layers[1])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["layers"][0].update(bits=5), "unsupported bit width 5"),
        (lambda d: d["layers"][0].update(action="melt"), "unknown action"),
        (lambda d: d.update(version=9), "version 9 is unknown"),
        (lambda d: d["layers"].pop(0), "entries must list layers"),
    ],
)
def test_bad_plans_are_refused(tmp_path, mutate, match):
    data = make_plan(scores_for(range(3)), 3.0).to_dict()
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LayerwiseError, match=match):
        Plan.load(path)
