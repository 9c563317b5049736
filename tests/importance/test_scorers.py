import pytest
import torch
from conftest import random_windows, tiny_model

from layerwise.core.errors import LayerwiseError
from layerwise.importance import SCORERS, score_model
from layerwise.importance.zd import z_share_above_one
from layerwise.model.adapter import decoder_layers, linear_modules


def make_identity(layer: torch.nn.Module) -> None:
    """Zero every projection: attention and MLP then add nothing to the residual stream."""
    with torch.no_grad():
        for module in linear_modules(layer).values():
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def test_identity_layer_gets_lowest_lim(arch):
    model = tiny_model(arch, n_layers=4)
    make_identity(decoder_layers(model)[2])
    scores = score_model(model, ["lim"], random_windows(3, 16), progress=False)["lim"]
    assert scores.scores[2] == pytest.approx(-1.0, abs=1e-6)
    assert min(range(4), key=lambda i: scores.scores[i]) == 2
    assert all(s > -1.0 + 1e-4 for i, s in enumerate(scores.scores) if i != 2)
    assert scores.ranking()[-1] == 2
    assert len(scores.linear_shapes) == 4 and scores.linear_shapes[0]


def test_one_pass_feeds_several_scorers():
    model = tiny_model("llama", n_layers=3)
    windows = random_windows(2, 16)
    both = score_model(model, ["lim", "zd"], windows, progress=False)
    alone = score_model(model, ["lim"], windows, progress=False)["lim"]
    assert both["lim"].scores == pytest.approx(alone.scores)
    assert both["zd"].calibration == {}


def test_zd_counts_share_above_one_sigma():
    torch.manual_seed(0)
    normal = torch.randn(200_000)
    # One-sided share of a standard normal above one sigma is about 15.9 %.
    assert z_share_above_one([normal]) == pytest.approx(0.1587, abs=0.005)
    spiky = torch.cat([torch.zeros(900), torch.full((100,), 10.0)])
    assert z_share_above_one([spiky]) == pytest.approx(0.1)


def test_zd_needs_no_calibration_and_prefers_fewer_outliers():
    model = tiny_model("llama", n_layers=3)
    with torch.no_grad():
        for module in linear_modules(decoder_layers(model)[1]).values():
            module.weight.copy_(torch.cat([torch.zeros(module.weight.numel() - 10), torch.ones(10)])
                                .reshape_as(module.weight))
    scores = score_model(model, ["zd"], None, progress=False)["zd"]
    assert scores.ranking()[0] == 1  # very few weights above one sigma: most important by the paper's order


def test_unknown_scorer_names_the_choices():
    with pytest.raises(LayerwiseError, match="unknown scorer 'nope'.*lim"):
        SCORERS.get("nope")
