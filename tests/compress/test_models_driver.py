import pytest
import torch
from conftest import random_windows, tiny_model

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import check_causal_lm, decoder_layers, layer_linear_shapes, linear_modules
from layerwise.model.driver import stream_layers


def test_adapter_finds_layers_and_linears(arch):
    model = tiny_model(arch, n_layers=3)
    layers = decoder_layers(model)
    assert len(layers) == 3
    shapes = layer_linear_shapes(model)
    assert len(shapes) == 3
    assert all(len(s) >= 4 for s in shapes), shapes  # attention and MLP projections at least
    for name, module in linear_modules(layers[0]).items():
        assert name and module is layers[0].get_submodule(name)
    check_causal_lm(model)


def test_stream_matches_full_forward(arch):
    model = tiny_model(arch, n_layers=3)
    windows = random_windows(2, 20)
    with torch.inference_mode():
        reference = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in windows]
    seen = []
    for step in stream_layers(model, windows, progress=False):
        outputs = step.run()
        step.outputs = outputs
        seen.append(step.index)
        if step.index < 2:  # the last hidden state has the final norm applied in most models
            for w, out in enumerate(outputs):
                torch.testing.assert_close(out, reference[w][step.index + 1], rtol=1e-4, atol=1e-5)
    assert seen == [0, 1, 2]


def test_unsupported_model_names_what_is_missing():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(LayerwiseError, match="cannot find the decoder layers"):
        decoder_layers(module)


def test_batched_stream_matches_one_window_at_a_time(arch):
    model = tiny_model(arch, n_layers=2)
    windows = random_windows(4, 12)
    single = [step.run() for step in stream_layers(model, windows, progress=False)]
    batched = [step.run() for step in stream_layers(model, windows, batch_size=2, progress=False)]
    for one, two in zip(single, batched, strict=True):
        assert len(one) == 4 and len(two) == 2 and two[0].shape[0] == 2
        torch.testing.assert_close(torch.cat(two), torch.cat(one), rtol=1e-4, atol=1e-5)
