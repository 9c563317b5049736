"""`layerwise.core.validate`: NaN, infinities and out-of-range numbers refused in one line by the API, before any
work (the model given is a path that does not exist: the number must be refused first)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import layerwise
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, LayerScores, Plan
from layerwise.core.validate import RULES, check_numbers, parse_number
from layerwise.eval import evaluate

NAN, INF = float("nan"), float("inf")
MISSING = "/nonexistent/model-dir"

BAD = [
    ("bits", NAN), ("bits", INF), ("bits", -INF), ("bits", 0), ("bits", -1.5), ("bits", True), ("bits", "3"),
    ("uniform", 5), ("uniform", 4.0), ("high", 16), ("low", 1), ("group_size", 0), ("group_size", 32.0),
    ("seed", -1), ("n_low", -1), ("calib_windows", 0), ("calib_windows", NAN), ("calib_len", 1),
    ("prune", -1), ("drop_attn", -2), ("drop_mlp", 1.5), ("tie", INF),
]


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(("name", "value"), BAD)
def test_compress_refuses_bad_numbers_before_any_work(name, value):
    with pytest.raises(LayerwiseError) as info:
        layerwise.compress(MISSING, **{"bits": 3.0, name: value}, out=None, progress=False)
    text = message(info)
    assert text.startswith(f"{name} must be ") and f"got {value!r}; pass e.g. {name}=" in text


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, v in BAD if n in ("bits", "high", "low", "group_size",
                                                                          "seed", "n_low")])
def test_make_plan_refuses_bad_numbers(name, value):
    scores = LayerScores("lim", [0.1, 0.2], [{"q": (64, 64)}] * 2)
    with pytest.raises(LayerwiseError) as info:
        layerwise.make_plan(scores, **{"bits": 3.0, name: value})
    assert message(info).startswith(f"{name} must be ")


@pytest.mark.parametrize("fn", ["score", "apply"])
@pytest.mark.parametrize(("name", "value"), [("calib_windows", -3), ("calib_windows", INF), ("calib_len", 0)])
def test_score_and_apply_refuse_bad_calibration_sizes(fn, name, value):
    plan = Plan([LayerAction(0, "quantize", 4, 32)])
    with pytest.raises(LayerwiseError) as info:
        if fn == "score":
            layerwise.score(MISSING, "lim", **{name: value}, progress=False)
        else:
            layerwise.apply(MISSING, plan, "rtn", **{name: value}, progress=False)
    assert message(info).startswith(f"{name} must be ")


@pytest.mark.parametrize(("name", "value"), [("batch_size", 2.5), ("batch_size", NAN), ("limit", NAN),
                                             ("limit", INF), ("num_fewshot", 1.5)])
def test_evaluate_refuses_bad_numbers(name, value):
    with pytest.raises(LayerwiseError) as info:
        evaluate(MISSING, "ppl", **{name: value}, progress=False)
    assert message(info).startswith(f"{name} must be ")


@pytest.mark.parametrize(("name", "value"), [("bits", 3), ("bits", 3.25), ("bits", np.float32(2.5)),
                                             ("uniform", 8), ("group_size", np.int64(64)), ("seed", 0),
                                             ("n_low", 0), ("calib_len", 2), ("limit", 0.1), ("prune", None)])
def test_good_numbers_pass(name, value):
    check_numbers(**{name: value})


def test_every_rule_describes_itself_and_parses_its_example():
    for name, rule in RULES.items():
        assert rule.problem(parse_number(name, rule.example)) is None, name


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bits", "nan", "must be a finite number above 0, got 'nan'; e.g. --bits 3.25"),
    ("bits", "-inf", "must be a finite number above 0, got '-inf'; e.g. --bits 3.25"),
    ("bits", "abc", "must be a finite number above 0, got 'abc'; e.g. --bits 3.25"),
    ("uniform", "5", "must be one of 2, 3, 4, 8, got '5'; e.g. --uniform 4"),
    ("group_size", "0", "must be a whole number of at least 1, got '0'; e.g. --group-size 128"),
    ("calib_len", "3.5", "must be a whole number of at least 2, got '3.5'; e.g. --calib-len 512"),
])
def test_parse_number_messages_name_the_flag_and_the_fix(name, text, expected):
    with pytest.raises(LayerwiseError) as info:
        parse_number(name, text)
    assert str(info.value) == expected


def test_parse_number_types():
    assert parse_number("bits", "3.25") == 3.25 and isinstance(parse_number("group_size", "64"), int)
    assert parse_number("limit", "50") == 50.0 and not math.isnan(parse_number("limit", "0.5"))
