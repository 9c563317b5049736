"""Capabilities declared on classes: planners, quantizers and scorers, and the checks that read them."""

from dataclasses import FrozenInstanceError, fields, is_dataclass
from typing import ClassVar

import pytest
import torch

from layerwise.api import make_plan
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerScores, QuantSpec, parse_options
from layerwise.importance import SCORERS, LayerScorer
from layerwise.importance.base import SCORE_OUTPUTS
from layerwise.planning.planners import (
    PLANNERS,
    LwqConfig,
    LwqPlanner,
    OptimalPlanner,
    Planner,
    check_planner_accepts,
    planner_config,
)
from layerwise.quant import QUANTIZERS, Quantizer
from layerwise.quant.codecs import codec_for

SHAPES = {"q": (64, 64), "up": (128, 64), "down": (64, 128)}
OPTIONS = "2:32,4:32,8:32"
KNOWN_OUTPUTS = {"scores", *SCORE_OUTPUTS}


def measured_scores(n_layers: int = 4) -> LayerScores:
    damage = {o.option(): [0.1 * (i + 1) / o.bits for i in range(n_layers)] for o in parse_options(OPTIONS)}
    return LayerScores("sensitivity", [0.0] * n_layers, [dict(SHAPES)] * n_layers, option_damage=damage)


def lim_scores(n_layers: int = 6) -> LayerScores:
    return LayerScores("lim", [0.1 * i for i in range(n_layers)], [dict(SHAPES)] * n_layers)


# --- arguments a planner does not take -------------------------------------------------------------


def test_optimal_refuses_lwq_settings_in_one_line():
    with pytest.raises(LayerwiseError) as info:
        make_plan(measured_scores(), 4.5, planner="optimal", high=8)
    message = str(info.value)
    assert "\n" not in message
    assert "'optimal'" in message and "high" in message and "bits, options, granularity, method" in message


@pytest.mark.parametrize("given", [dict(low=2), dict(group_size=128), dict(sym=False), dict(order="reverse"),
                                   dict(seed=1), dict(n_low=1)])
def test_optimal_refuses_every_lwq_only_setting(given):
    name = next(iter(given))
    with pytest.raises(LayerwiseError, match=f"does not take {name} "):
        make_plan(measured_scores(), 4.5, planner="optimal", **given)


def test_lwq_refuses_options():
    with pytest.raises(LayerwiseError, match="planner 'lwq' does not take options"):
        make_plan(lim_scores(), 3.0, options="2:128,4:128")


def test_omitted_arguments_are_not_refused_and_defaults_come_from_the_config():
    scores = measured_scores()
    assert make_plan(scores, 4.5).made_by["planner"] == "optimal"  # every setting left out
    assert make_plan(scores, 4.5, planner="optimal", options=OPTIONS, method="rtn").bits_per_layer()
    lim = lim_scores()
    implicit = make_plan(lim, 3.0)
    explicit = make_plan(lim, 3.0, high=4, low=2, group_size=128, sym=False, order="importance", seed=0)
    assert implicit == explicit
    assert list(implicit.made_by) == ["planner", "scorer", "model", *(f.name for f in fields(LwqConfig))]
    defaults = LwqConfig(bits=3.0)
    assert {k: implicit.made_by[k] for k in ("high", "low", "group_size", "sym", "order", "seed")} == {
        k: getattr(defaults, k) for k in ("high", "low", "group_size", "sym", "order", "seed")}


def test_optimal_needs_a_budget():
    with pytest.raises(LayerwiseError, match="planner 'optimal' needs a budget: give --bits"):
        make_plan(measured_scores(), None, planner="optimal")


def test_planner_config_builds_from_given_arguments():
    config = planner_config(OptimalPlanner, bits=4.0, options="2:32,4:32:gptq", method="rtn")
    assert config.options == (QuantSpec(2, 32, "rtn"), QuantSpec(4, 32, "gptq"))
    assert planner_config(OptimalPlanner, bits=4.0, options=[QuantSpec(8, 32)]).options == (QuantSpec(8, 32),)
    assert planner_config(LwqPlanner, bits=3.0, high=8) == LwqConfig(bits=3.0, high=8)
    with pytest.raises(LayerwiseError, match=r"planner 'lwq' does not take colour \(it takes: bits, high"):
        planner_config(LwqPlanner, bits=3.0, colour="red")
    with pytest.raises(FrozenInstanceError):
        config.bits = 2.0


def run_cli(*argv, capsys):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_refuses_a_flag_the_planner_does_not_take(tmp_path, capsys):
    scores = tmp_path / "scores.json"
    measured_scores().save(scores)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli("plan", "--scores", scores, "--planner", "optimal", "--high", 8, "--bits", 4.5,
                           "--out", tmp_path / "plan.json", capsys=capsys)
    assert code == 2
    assert err.startswith("layerwise: error: planner 'optimal' does not take high") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # Without the flag the same command plans, and lwq gets its defaults from the Config.
    code, _, _ = run_cli("plan", "--scores", scores, "--planner", "optimal", "--bits", 4.5,
                         "--out", tmp_path / "plan.json", capsys=capsys)
    assert code == 0 and (tmp_path / "plan.json").is_file()
    lim = tmp_path / "lim.json"
    lim_scores().save(lim)
    code, _, _ = run_cli("plan", "--scores", lim, "--bits", 3.0, "--out", tmp_path / "lwq.json", capsys=capsys)
    assert code == 0
    from layerwise.core.types import Plan

    assert Plan.load(tmp_path / "lwq.json").to_dict() == make_plan(LayerScores.load(lim), 3.0).to_dict()


# --- every registered implementation declares its capabilities ------------------------------------


@pytest.mark.parametrize("name", PLANNERS.names())
def test_every_planner_declares_its_capabilities(name):
    cls = PLANNERS.get(name)
    assert issubclass(cls, Planner) and cls.name == name
    assert is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
    assert "__post_init__" in vars(cls.Config)  # validates itself
    assert isinstance(cls.requires, frozenset) and cls.requires <= KNOWN_OUTPUTS
    assert "plan" in vars(cls)
    assert set(cls.arguments()) >= {f.name for f in fields(cls.Config)}


@pytest.mark.parametrize("name", QUANTIZERS.names())
def test_every_quantizer_declares_its_capabilities(name):
    cls = QUANTIZERS.get(name)
    assert issubclass(cls, Quantizer) and cls.name == name
    assert isinstance(cls.needs_hessian, bool) and isinstance(cls.shares_hessian, bool)
    assert isinstance(cls.needs_reference_inputs, bool) and cls.needs_hessian >= cls.needs_reference_inputs
    assert cls.storage == str(getattr(codec_for(name).format, "value", codec_for(name).format))
    assert "quantize" in vars(cls)
    assert ("quantize_shared" in vars(cls)) == cls.shares_hessian
    cls()  # nothing abstract left


def test_quantizer_classes_give_their_functions_results():
    from layerwise.quant import quantize_gptq, quantize_rtn

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    hessian = 2 * x.T @ x / x.shape[0]
    for cls, fn, spec in [(QUANTIZERS.get("rtn"), quantize_rtn, QuantSpec(3, 32)),
                          (QUANTIZERS.get("gptq"), quantize_gptq, QuantSpec(3, 32, "gptq"))]:
        a, b = cls().quantize(weight, spec, hessian), fn(weight, spec, hessian)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        assert torch.equal(a.zeros, b.zeros) and a.format == cls.storage


@pytest.mark.parametrize("name", SCORERS.names())
def test_every_scorer_declares_what_it_provides(name):
    cls = SCORERS.get(name)
    assert issubclass(cls, LayerScorer) and cls.name == name
    assert isinstance(cls.provides, frozenset) and "scores" in cls.provides and cls.provides <= KNOWN_OUTPUTS
    assert isinstance(cls.layer_local, bool)
    # It declares exactly the optional outputs it fills (the methods it overrides).
    overridden = {o for o in SCORE_OUTPUTS if getattr(cls, o) is not getattr(LayerScorer, o)}
    assert overridden == cls.provides - {"scores"}


# --- the scorer/planner requirement check -----------------------------------------------------------


def test_check_planner_accepts():
    check_planner_accepts(OptimalPlanner, SCORERS.get("sensitivity"))
    for scorer in SCORERS.names():
        check_planner_accepts(LwqPlanner, SCORERS.get(scorer))
    with pytest.raises(LayerwiseError) as info:
        check_planner_accepts(OptimalPlanner, SCORERS.get("lim"))
    assert str(info.value) == ("planner 'optimal' needs measured damage per option; scorer 'lim' gives none "
                               "(use --scorer sensitivity)")

    class TiePlanner(Planner):
        name: ClassVar[str] = "tie-test"
        Config = LwqConfig
        requires: ClassVar[frozenset[str]] = frozenset({"tie_damage"})

        def plan(self, scores, config):
            raise NotImplementedError

    with pytest.raises(LayerwiseError, match=r"'tie-test' needs measured damage of tying layers; scorer 'zd' gives "
                                             r"none \(use --scorer tie\)"):
        check_planner_accepts(TiePlanner, SCORERS.get("zd"))
