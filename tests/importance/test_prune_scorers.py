"""The pruning and tying scorers: angular, sublayer, ppl_drop and tie, on every supported architecture."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, random_windows, tiny_model

import layerwise.importance.base as base
from layerwise.api import score
from layerwise.core.types import LayerScores
from layerwise.importance import score_model
from layerwise.importance.angular import sampled_positions
from layerwise.importance.ppl_drop import PplDropScorer, batch_nll
from layerwise.importance.sublayer import SublayerScorer
from layerwise.importance.tie import TieScorer
from layerwise.model.adapter import decoder_layers, layers_path, linear_modules, set_submodule
from layerwise.model.driver import stream_layers

PRUNE_SCORERS = ["angular", "sublayer", "tie", "ppl_drop"]
# Last name of the projection that writes each sub-layer's output, across the 7 tiny architectures:
# o_proj (llama, qwen2, mistral, gemma3, phi3), out_proj (opt), c_proj (gpt2 attn and mlp), down_proj, fc2.
OUTPUT_PROJECTIONS = {"attn": ("o_proj", "out_proj", "c_proj"), "mlp": ("down_proj", "c_proj", "fc2")}
ATTENTION_HEADS = ("self_attn", "attn")


def zero_output(layer: torch.nn.Module, sublayers: tuple[str, ...] = ("attn", "mlp")) -> None:
    """Zero the output projection (weight and bias) of the given sub-layers: they then add nothing."""
    zeroed = set()
    with torch.no_grad():
        for name, module in linear_modules(layer).items():
            head, last = name.split(".")[0], name.rsplit(".", 1)[-1]
            sublayer = "attn" if head in ATTENTION_HEADS else "mlp"
            if sublayer in sublayers and last in OUTPUT_PROJECTIONS[sublayer]:
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                zeroed.add(sublayer)
    assert zeroed == set(sublayers), f"no output projection found for {set(sublayers) - zeroed}"


def without_layers(model: torch.nn.Module, removed: list[int]) -> torch.nn.Module:
    """An independent copy of `model` whose decoder has only the layers not in `removed`."""
    pruned = copy.deepcopy(model)
    layers = decoder_layers(pruned)
    keep = [i for i in range(len(layers)) if i not in removed]
    set_submodule(pruned, layers_path(pruned), torch.nn.ModuleList([layers[i] for i in keep]))
    config = pruned.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            setattr(config, attr, len(keep))
    if getattr(config, "layer_types", None):  # gemma3 and qwen2 pick each position's masks from this list
        config.layer_types = [config.layer_types[i] for i in keep]
    return pruned


@torch.no_grad()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return sum(batch_nll(model, w[None]) for w in windows) / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def sampled_windows(model: torch.nn.Module, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token windows sampled from the model itself: on them the whole model has the lowest expected loss."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=generator)
    for _ in range(length - 1):
        probs = model(input_ids=ids, use_cache=False).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def sharpen(model: torch.nn.Module, factor: float = 30.0) -> None:
    """Scale the logits so that the random model predicts confidently and every real layer matters."""
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: out * factor)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y or x == pytest.approx(y, rel=1e-6, abs=1e-9)
        for x, y in zip(a, b, strict=True)
    )


# angular


def test_sampled_positions_end_on_the_last_token_and_skip_the_first():
    assert sampled_positions(24, 4) == [3, 7, 11, 15, 19, 23]
    positions = sampled_positions(512, 16)
    assert len(positions) == 32 and positions[-1] == 511 and positions[0] == 15
    assert sampled_positions(1, 16) == [0]


def test_angular_identity_layer_is_zero_and_lowest(arch):
    model = tiny_model(arch)
    zero_output(decoder_layers(model)[2])
    result = score_model(model, ["angular"], random_windows(3, 24), progress=False)["angular"]
    distance = result.block_distance
    assert sorted(distance, key=int) == ["1", "2", "3", "4"]
    assert [len(distance[str(n)]) for n in range(1, 5)] == [4, 3, 2, 1]
    assert distance["1"] == result.scores
    assert result.scores[2] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-3 for i, s in enumerate(result.scores) if i != 2)
    assert result.ranking()[-1] == 2
    # an identity layer adds no distance to a block that spans it
    assert distance["2"][1] == pytest.approx(distance["1"][1], abs=1e-6)


def test_angular_matches_states_from_the_models_own_forward():
    model = tiny_model("llama")
    windows = random_windows(2, 24)
    states: list[list[torch.Tensor]] = [[] for _ in range(5)]
    layers = decoder_layers(model)
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: states[i].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    handles.append(layers[-1].register_forward_hook(lambda _m, _a, out: states[4].append(out)))
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    positions = [7, 23]  # stride 16 back from the last of 24 positions
    sampled = [torch.cat([h[0, positions] for h in s]).double() for s in states]
    result = score_model(model, ["angular"], windows, progress=False)["angular"]
    for n in range(1, 5):
        for start in range(5 - n):
            cos = F.cosine_similarity(sampled[start], sampled[start + n], dim=-1).clamp(-1, 1)
            expected = float(torch.arccos(cos).mean()) / math.pi
            assert result.block_distance[str(n)][start] == pytest.approx(expected, rel=1e-5)


# sublayer


def test_sublayer_hooks_see_what_is_added_to_the_residual(arch):
    model = tiny_model(arch)
    scorer = SublayerScorer()
    for step in stream_layers(model, random_windows(2, 16), progress=False):
        with scorer.observe(step):
            outputs = step.run()
        seen = scorer._seen
        for x, attn, mlp, y in zip(step.inputs, seen["attn"], seen["mlp"], outputs, strict=True):
            torch.testing.assert_close(x + attn + mlp, y, rtol=1e-5, atol=1e-5)
            assert attn.abs().max() > 0 and mlp.abs().max() > 0
        step.outputs = outputs
        scorer.score_layer(step, outputs)  # also runs the scorer's own add-up check


def test_sublayer_zero_attention_scores_zero(arch):
    model = tiny_model(arch)
    zero_output(decoder_layers(model)[1], ("attn",))
    zero_output(decoder_layers(model)[3])
    windows = random_windows(3, 16)
    both = score_model(model, ["sublayer", "lim"], windows, progress=False)
    result = both["sublayer"]
    attn, mlp = result.module_scores["attn"], result.module_scores["mlp"]
    assert attn[1] == pytest.approx(0.0, abs=1e-6)
    assert mlp[1] > 1e-4
    assert attn[3] == pytest.approx(0.0, abs=1e-6) and mlp[3] == pytest.approx(0.0, abs=1e-6)
    assert all(a > 1e-4 for i, a in enumerate(attn) if i not in (1, 3))
    assert result.scores[3] == pytest.approx(0.0, abs=1e-6)
    # the layer score is ShortGPT's block influence, 1 - mean cos(input, output) = 1 + LIM
    assert result.scores == pytest.approx([1 + s for s in both["lim"].scores], abs=1e-9)


# ppl_drop


def test_ppl_drop_removes_the_identity_layer_first_and_agrees_with_pruned_models(arch):
    model = tiny_model(arch)
    zero_output(decoder_layers(model)[2])
    sharpen(model)
    windows = sampled_windows(model, 4, 24)
    scorer = PplDropScorer(max_remove=3)
    scorer.progress = False
    scorer.prepare(model, windows, batch_size=2)
    assert scorer.order[0] == 2
    assert scorer.base_nll == pytest.approx(mean_nll(model, windows), rel=1e-5)
    assert scorer.first_round_nll[2] == pytest.approx(scorer.base_nll, rel=1e-6)
    for i in range(4):  # each layer removed alone, from an independently built model
        assert scorer.first_round_nll[i] == pytest.approx(mean_nll(without_layers(model, [i]), windows), rel=1e-5)
    for k, chosen in enumerate(scorer.order):
        before = scorer.order[:k]
        losses = {i: mean_nll(without_layers(model, [*before, i]), windows) for i in range(4) if i not in before}
        assert losses[chosen] == pytest.approx(scorer.step_nll[k], rel=1e-5)
        assert losses[chosen] <= min(losses.values()) + 1e-6


def test_ppl_drop_ranks_removed_layers_below_kept_ones():
    model = tiny_model("llama", n_layers=6)
    sharpen(model)
    windows = sampled_windows(model, 3, 16)
    scorer = PplDropScorer()
    scorer.progress = False
    scorer.prepare(model, windows, batch_size=1)
    assert len(scorer.order) == 2  # a third of 6 layers
    result = score_model(model, ["ppl_drop"], windows, progress=False)["ppl_drop"]
    ranking = result.ranking()  # most important first
    assert ranking[-2:] == scorer.order[::-1]
    kept = ranking[:-2]
    assert [scorer.first_round_nll[i] for i in kept] == sorted((scorer.first_round_nll[i] for i in kept), reverse=True)
    assert sorted(result.scores) == [float(r) for r in range(6)]


def test_ppl_drop_alone_runs_no_layer_stream(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the layer stream ran")

    monkeypatch.setattr(base, "stream_layers", refuse)
    model = tiny_model("gpt2", n_layers=3)
    result = score_model(model, ["ppl_drop", "zd"], random_windows(20, 12), calibration={"windows": 20},
                         progress=False)
    assert result["ppl_drop"].calibration["windows"] == 16  # the scorer's default subset
    assert result["zd"].calibration == {}
    assert "forward" not in decoder_layers(model)[0].__dict__


# tie


def test_tie_damage_is_zero_for_a_copied_layer(arch):
    model = tiny_model(arch)
    layers = decoder_layers(model)
    layers[2].load_state_dict(layers[1].state_dict())
    result = score_model(model, ["tie"], random_windows(3, 16), progress=False)["tie"]
    damage = result.tie_damage
    assert sorted(damage) == ["1", "2", "3"]
    assert damage["1"][2] == 0.0
    assert all(v > 1e-3 for j, v in enumerate(damage["1"]) if j not in (0, 2))
    assert damage["2"][3] == pytest.approx(damage["1"][3], rel=1e-6)  # layer 1 holds layer 2's weights
    for d in (1, 2, 3):
        assert all(math.isnan(v) for v in damage[str(d)][:d])
        assert all(v > 1e-3 for j, v in enumerate(damage[str(d)][d:], start=d) if (j, d) != (2, 1))
    assert result.scores[1:] == damage["1"][1:]
    assert result.scores[0] == max(result.scores[1:])
    assert result.ranking()[-1] == 2


def test_tie_damage_is_inf_between_layers_of_different_shapes():
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama")
    config = copy.deepcopy(model.config)
    config.intermediate_size = 96
    decoder_layers(model)[1].mlp = LlamaMLP(config)
    result = score_model(model, ["tie"], random_windows(2, 16), scorer_options={"tie": {"max_offset": 2}},
                         progress=False)["tie"]
    assert result.tie_damage["1"][1] == math.inf and result.tie_damage["1"][2] == math.inf
    assert result.tie_damage["2"][3] == math.inf
    assert math.isfinite(result.tie_damage["1"][3]) and math.isfinite(result.tie_damage["2"][2])


def test_tie_reads_only_its_windows():
    model = tiny_model("llama")
    windows = random_windows(6, 12)
    options = {"tie": {"windows": 2}}
    alone = score_model(model, ["tie"], windows, scorer_options=options, progress=False)["tie"]
    with_lim = score_model(model, ["tie", "lim"], windows, scorer_options=options, progress=False)["tie"]
    first_two = score_model(model, ["tie"], windows[:2], progress=False)["tie"]
    assert close(alone.tie_damage["1"], first_two.tie_damage["1"])
    assert close(with_lim.tie_damage["1"], first_two.tie_damage["1"])
    assert TieScorer(windows=2).windows_needed() == 2


# all four


def test_one_pass_equals_one_at_a_time(arch):
    model = tiny_model(arch)
    windows = random_windows(3, 16)
    together = score_model(model, PRUNE_SCORERS, windows, progress=False)
    for name in PRUNE_SCORERS:
        alone = score_model(model, [name], windows, progress=False)[name]
        assert close(together[name].scores, alone.scores), name
        for field in ("module_scores", "block_distance", "tie_damage"):
            got, want = getattr(together[name], field), getattr(alone, field)
            assert sorted(got) == sorted(want) and all(close(got[k], want[k]) for k in want), (name, field)


def test_scores_round_trip_through_json(tmp_path):
    model = tiny_model("gemma3")
    results = score_model(model, PRUNE_SCORERS, random_windows(2, 16), progress=False)
    for name, result in results.items():
        path = tmp_path / f"{name}.json"
        result.save(path)
        loaded = LayerScores.load(path)
        assert loaded.scorer == name and close(loaded.scores, result.scores)
        for field in ("module_scores", "block_distance", "tie_damage"):
            got, want = getattr(loaded, field), getattr(result, field)
            assert sorted(got) == sorted(want) and all(close(got[k], want[k]) for k in want), (name, field)


@pytest.mark.parametrize("name", PRUNE_SCORERS)
def test_api_score_runs_each_scorer(name):
    model = tiny_model("qwen2")
    result = score(model, name, calib=random_windows(3, 16), progress=False)
    assert result.scorer == name and result.n_layers == 4
    assert all(math.isfinite(s) for s in result.scores)
    assert result.calibration["windows"] == 3
