"""The error-minimising ``mse`` grid: never worse than min/max on its objective, valid stored values, and
the opt-in path from the spec, the API and the CLI down to a checkpoint that loads back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import DEFAULT_GRID, GRIDS, LayerAction, Plan, QuantSpec
from layerwise.engine.recipe import Recipe
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.quant import (
    GRID_SEARCHES,
    HessianAccumulator,
    QuantLinear,
    grid_params,
    group_error,
    group_params,
    grouped_params,
    mse_group_params,
    quantize_gptq,
    quantize_rtn,
    unpack,
)

BITS = (2, 3, 4, 8)


def weights_of(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * 0.02
    if kind == "heavy":  # Student-t with 2 degrees of freedom: a few weights far out in every group
        chi2 = torch.randn(*shape, 2, generator=gen).square().sum(-1) / 2
        w = w / chi2.sqrt()
    if kind == "skewed":  # mostly positive, with a long tail on one side: the asymmetric zero has work to do
        w = w.abs() * 3 - 0.01
    return w


def random_importance(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Positive weights spread over orders of magnitude, as a Hessian diagonal is."""
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(2 * torch.randn(*shape, generator=gen))


def naive_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: torch.Tensor) -> torch.Tensor:
    """The objective straight from its definition, through the stored fp16 values."""
    s = scale.half().float()[..., None]
    z = zero.half().float()[..., None]
    q = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    return (d * (w - (q - z) * s) ** 2).sum(-1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("kind", ("normal", "heavy", "skewed"))
@pytest.mark.parametrize("weighted", (False, True))
def test_mse_never_worse_than_minmax_and_better_overall(bits, sym, kind, weighted):
    seed = bits * 100 + 10 * sym + len(kind) + weighted
    w = weights_of(kind, (48, 12, 64), seed)  # 48 rows, 12 groups of 64
    d = random_importance((12, 64), seed + 1) if weighted else None  # one value per column, as diag(H)
    ones = torch.ones(12, 64)
    minmax = group_params(w, bits, sym)
    searched = mse_group_params(w, bits, sym, d)
    before = group_error(w, *minmax, bits, d)
    after = group_error(w, *searched, bits, d)
    assert after.shape == (48, 12)
    assert bool((after <= before).all())  # group by group, on the objective it minimises
    assert float(after.sum()) < 0.995 * float(before.sum())  # and it does find something
    # The objective is the definition's, through the stored values (not an internal approximation).
    dense = ones if d is None else d
    torch.testing.assert_close(after, naive_error(w, *searched, bits, dense), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
def test_scales_are_fp16_values_and_zeros_integers_in_range(bits, sym):
    w = weights_of("heavy", (32, 6, 64), seed=bits)
    scale, zero = mse_group_params(w, bits, sym, random_importance((6, 64), seed=bits))
    assert scale.dtype == zero.dtype == torch.float32
    assert torch.equal(scale.half().float(), scale) and bool((scale > 0).all())
    assert torch.equal(zero.round(), zero) and bool(((zero >= 0) & (zero <= 2**bits - 1)).all())
    if sym:
        assert bool((zero == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
def test_rtn_mse_codes_in_range_and_error_not_above_minmax(bits, sym):
    weight = weights_of("heavy", (40, 200), seed=7 + bits)  # 200 = 3 * 64 + 8: a short last group
    spec = QuantSpec(bits, 64, "rtn", sym, "mse")
    qw = quantize_rtn(weight, spec)
    codes = unpack(qw.qweight, bits, 200)
    assert int(codes.max()) <= 2**bits - 1
    assert qw.scales.dtype == torch.float16 and qw.spec.grid == "mse"
    base = quantize_rtn(weight, QuantSpec(bits, 64, "rtn", sym))
    per_group = [(weight - q.dequantize()).square().split(64, dim=1) for q in (qw, base)]
    for mse_part, minmax_part in zip(*per_group, strict=True):
        assert bool((mse_part.sum(1) <= minmax_part.sum(1) * (1 + 1e-6)).all())
    assert float((weight - qw.dequantize()).norm()) < float((weight - base.dequantize()).norm())


def test_importance_decides_what_the_grid_fits():
    """An outlier whose input never fires (d = 0) must not stretch the grid the other weights sit on."""
    w = weights_of("normal", (16, 64), seed=3)
    w[:, 5] = 0.3  # far beyond the others (about 0.02), on one side
    d = torch.ones(64)
    d[5] = 0.0
    weighted = mse_group_params(w, 3, False, d)
    unweighted = mse_group_params(w, 3, False)
    minmax = group_params(w, 3, False)
    errors = [float(group_error(w, *params, 3, d).sum()) for params in (weighted, unweighted, minmax)]
    assert errors[0] < 0.5 * errors[1] < 0.5 * errors[2]
    # Unweighted, the outlier still holds the top of the range; weighted, the step fits the others.
    assert bool((weighted[0] < 0.5 * unweighted[0]).all())


def test_degenerate_groups_keep_minmax():
    w = torch.zeros(4, 3, 64)
    w[1] = 1e-30  # below fp16's smallest subnormal scale
    w[2, 0] = torch.linspace(-1, 1, 64)
    d = torch.ones(3, 64)
    d[2] = 0.0  # every weight of group 2 unimportant: nothing to improve, min/max stays
    scale, zero = mse_group_params(w, 4, False, d)
    minmax_scale, minmax_zero = group_params(w, 4, False)
    assert bool(torch.isfinite(scale).all() and torch.isfinite(zero).all())
    assert torch.equal(scale[0], minmax_scale[0]) and torch.equal(scale[:, 2], minmax_scale[:, 2])
    assert torch.equal(zero[:, 2], minmax_zero[:, 2])


def test_grouped_params_match_per_group_search():
    weight = weights_of("heavy", (10, 150), seed=11)  # groups 64, 64, 22
    d = random_importance((150,), seed=12)
    spec = QuantSpec(3, 64, "rtn", False, "mse")
    scale, zero = grouped_params(weight, spec, d)
    for g, start in enumerate(range(0, 150, 64)):
        part = slice(start, start + 64)
        expected = mse_group_params(weight[:, part], 3, False, d[part])
        torch.testing.assert_close(scale[:, g], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(zero[:, g], expected[1], rtol=0, atol=0)
    minmax = grouped_params(weight, QuantSpec(3, 64, "rtn", False), d)
    assert torch.equal(minmax[0][:, 2], group_params(weight[:, 128:], 3, False)[0])


def gptq_case(seed: int = 0, in_features: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = weights_of("heavy", (32, in_features), seed)
    x = torch.randn(512, in_features, generator=gen) * torch.exp(torch.randn(in_features, generator=gen))
    acc = HessianAccumulator(in_features)
    acc.add(x)
    return weight, acc.hessian


@pytest.mark.parametrize("sym", (False, True))
def test_gptq_static_groups_use_the_weighted_search(sym):
    weight, hessian = gptq_case(seed=1)
    spec = QuantSpec(3, 32, "gptq", sym, "mse")
    qw = quantize_gptq(weight, spec, hessian)  # act-order (default): static groups from the weight itself
    expected, _ = grouped_params(weight, spec, hessian.diagonal())
    assert torch.equal(qw.scales.float(), expected)
    assert int(unpack(qw.qweight, 3, 128).max()) <= 7
    unweighted, _ = grouped_params(weight, spec)
    assert not torch.equal(expected, unweighted)  # diag(H) changed the choice


def test_gptq_without_act_order_uses_the_grid():
    weight, hessian = gptq_case(seed=2)
    spec = QuantSpec(3, 32, "gptq", False, "mse")
    mse = quantize_gptq(weight, spec, hessian, act_order=False)
    base = quantize_gptq(weight, QuantSpec(3, 32, "gptq"), hessian, act_order=False)
    assert mse.scales.shape == base.scales.shape and not torch.equal(mse.scales, base.scales)
    assert torch.equal(mse.scales.float().half().float(), mse.scales.float())
    assert int(unpack(mse.qweight, 3, 128).max()) <= 7


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ("rtn", "gptq"))
def test_compress_with_mse_saves_and_loads_back(method, tmp_path):
    model = tiny_model("llama", n_layers=2)
    result = layerwise.compress(model, None, uniform=3, method=method, group_size=32, grid="mse",
                                calib=random_windows(4, 40), progress=False)  # 160 tokens: H full rank
    ids = random_windows(1, 12, seed=5)
    before = logits(result.model, ids)
    assert all(a.grid == "mse" for a in result.plan.layers)
    layerwise.save(result, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "layerwise.json").read_text())
    assert {a["grid"] for a in meta["plan"]["layers"]} == {"mse"} and meta["recipe"]["grid"] == "mse"
    ckpt = layerwise.load(tmp_path / "ckpt")
    assert torch.equal(logits(ckpt.model, ids), before)
    modules = [m for layer in decoder_layers(ckpt.model) for m in linear_modules(layer).values()]
    assert modules and all(isinstance(m, QuantLinear) and m.spec.grid == "mse" for m in modules)


def test_default_grid_writes_nothing_new(tmp_path):
    """Plans, specs and recipes without a grid serialise as they did before grids existed."""
    model = tiny_model("llama", n_layers=2)
    result = layerwise.compress(model, None, uniform=4, method="rtn", group_size=32, progress=False,
                                out=tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "layerwise.json").read_text())
    assert all("grid" not in a for a in meta["plan"]["layers"]) and "grid" not in meta["recipe"]
    assert all(a.grid is None for a in result.plan.layers)
    assert QuantSpec(4, 64).to_dict() == {"bits": 4, "group_size": 64, "method": "rtn", "sym": False}
    assert "grid" not in Recipe().compared() and Recipe(grid="mse").compared()["grid"] == "mse"


def test_plan_grids_round_trip():
    override = QuantSpec(8, 64, "rtn", False, "mse")
    plan = Plan([LayerAction(0, "quantize", 3, 64, grid="mse", overrides={"mlp.down_proj": override}),
                 LayerAction(1, "quantize", 4, 64), LayerAction(2, "keep")])
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.layers[0].module_spec("self_attn.q_proj").grid == "mse"
    assert again.layers[0].module_spec("mlp.down_proj") == override
    assert again.layers[1].module_spec("x", default_grid="mse").grid == "mse"  # unnamed: apply's grid
    assert again.layers[1].module_spec("x").grid == DEFAULT_GRID


def test_every_grid_name_has_a_search():
    assert tuple(GRID_SEARCHES) == GRIDS


@pytest.mark.parametrize("make", [
    lambda: QuantSpec(4, 64, "rtn", False, "bogus"),
    lambda: LayerAction(0, "quantize", 4, 64, grid="bogus"),
    lambda: Recipe(grid="bogus"),
    lambda: grid_params(torch.zeros(2, 8), 4, False, "bogus"),
    lambda: layerwise.compress(tiny_model("llama", n_layers=2), None, uniform=4, method="rtn", grid="bogus",
                               progress=False),
], ids=["spec", "action", "recipe", "grid_params", "compress"])
def test_unknown_grid_is_one_clear_error(make):
    with pytest.raises(LayerwiseError, match=r"^unknown grid 'bogus'; choose one of minmax, mse$"):
        make()


def test_grid_refused_where_it_does_not_apply():
    with pytest.raises(LayerwiseError, match="grid 'mse' does not apply"):
        QuantSpec(4, 64, "nf4", False, "mse")
    with pytest.raises(LayerwiseError, match="keep action quantizes nothing"):
        LayerAction(0, "keep", grid="mse")


@pytest.mark.parametrize("command", ("compress", "apply"))
def test_cli_grid_flag(command, tmp_path, capsys, monkeypatch):
    seen = {}

    def fake(*args, **kwargs):
        seen["grid"] = kwargs.get("grid")
        raise LayerwiseError("stopped here")

    monkeypatch.setattr(f"layerwise.api.{command}", fake)
    monkeypatch.setattr("layerwise.model.loading.load_model", lambda *a, **k: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr("layerwise.engine.applier.check_plan_fits", lambda *a: None)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"format": "layerwise.plan", "version": 1, "layers": [{"layer": 0, "action": "keep"}]}))
    extra = ["--plan", str(plan)] if command == "apply" else ["--uniform", "4"]
    base = ["--quiet", command, str(tmp_path / "model"), *extra, "--out", str(tmp_path / "c")]
    assert main([*base, "--grid", "mse"]) == 2 and "stopped here" in capsys.readouterr().err
    assert seen["grid"] == "mse"
    assert main(base) == 2 and seen["grid"] == DEFAULT_GRID
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--grid", "bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--grid" in err and len(err.strip().splitlines()) == 1
