"""evaluate(): layerwise's ppl plus lm-eval tasks on the model in memory, the schema, and every refusal."""

from __future__ import annotations

import json
import sys

import pytest
from eval_helpers import load_tiny

from layerwise.core.errors import LayerwiseError
from layerwise.eval import EvalResult, PerplexityProtocol, evaluate, parse_tasks
from layerwise.eval.harness import convert_lm_eval_results
from layerwise.eval.results import FORMAT, SCHEMA_VERSION

SMALL = PerplexityProtocol(name="wiki-256tok-w64", max_tokens=256, window_len=64)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_tiny(tiny_model_dir)


def test_parse_tasks():
    assert parse_tasks("ppl, wiki_mc,ppl") == ["ppl", "wiki_mc"]
    assert parse_tasks(["wiki_ppl"]) == ["wiki_ppl"]
    for bad in ("ppl,,wiki_mc", "", []):
        with pytest.raises(LayerwiseError, match="empty task name"):
            parse_tasks(bad)


def test_offline_tasks_end_to_end_on_the_model_in_memory(tiny):
    model, tokenizer = tiny
    result = evaluate(model, "ppl,wiki_mc,wiki_ppl", tokenizer=tokenizer, limit=3, batch_size=2, protocol=SMALL,
                      model_name="tiny", progress=False)
    data = json.loads(json.dumps(result.to_dict()))  # plain JSON all the way down
    assert (data["format"], data["schema_version"], data["model"]) == (FORMAT, SCHEMA_VERSION, "tiny")
    assert set(data) == {"format", "schema_version", "model", "results", "config", "versions"}
    ppl = data["results"]["ppl"]
    assert ppl["protocol"] == "wiki-256tok-w64" and ppl["tokens"] == 4 * 63 and ppl["perplexity"] > 1
    assert set(ppl) >= {"perplexity", "nll", "tokens", "protocol", "protocol_description"}
    mc = data["results"]["wiki_mc"]
    assert 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1 and mc["samples"] == 3 and "acc_stderr" in mc
    rolling = data["results"]["wiki_ppl"]
    assert rolling["word_perplexity"] > 1 and rolling["bits_per_byte"] > 0 and rolling["samples"] == 3
    assert data["config"]["tasks"] == ["ppl", "wiki_mc", "wiki_ppl"] and data["config"]["limit"] == 3
    assert data["config"]["model_info"]["kind"] == "in-memory"
    assert data["versions"]["lm_eval"] and data["versions"]["tasks"] == {"wiki_mc": 1.0, "wiki_ppl": 1.0}
    assert EvalResult.from_dict(data).to_dict() == data
    assert tokenizer.pad_token is None  # lm-eval's wrapper got a copy to set its pad token on


def test_batching_does_not_change_the_scores(tiny):
    model, tokenizer = tiny
    one, four = (evaluate(model, "wiki_mc", tokenizer=tokenizer, limit=6, batch_size=b, progress=False)
                 for b in (1, 4))
    assert one.results["wiki_mc"]["acc"] == four.results["wiki_mc"]["acc"]
    assert one.results["wiki_mc"]["acc_norm"] == four.results["wiki_mc"]["acc_norm"]


def test_a_checkpoint_directory_is_evaluated_as_compressed(tiny_model_dir, tmp_path):
    import layerwise

    model, tokenizer = load_tiny(tiny_model_dir)
    layerwise.save(layerwise.compress(model, bits=None, uniform=2, method="rtn", group_size=32, tokenizer=tokenizer,
                                      progress=False), tmp_path / "ckpt")
    result = evaluate(str(tmp_path / "ckpt"), "ppl", protocol=SMALL, progress=False)
    info = result.config["model_info"]
    assert info["kind"] == "checkpoint" and info["avg_bits"] == pytest.approx(2 + (16 + 2) / 32)
    assert info["path"] == str((tmp_path / "ckpt").resolve())


def test_ppl_needs_no_lm_eval_and_other_tasks_say_how_to_install_it(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    result = evaluate(model, "ppl", tokenizer=tokenizer, protocol=SMALL, progress=False)
    assert result.perplexity > 1 and "lm_eval" not in result.versions
    with pytest.raises(LayerwiseError, match=r"pip install 'layerwise\[eval\]'"):
        evaluate(model, "ppl,wiki_mc", tokenizer=tokenizer, progress=False)


def test_unknown_task_names_the_offline_tasks_and_close_matches(tiny):
    model, tokenizer = tiny
    expected = r"unknown task\(s\) 'wiki_mcq'.*wiki_mc, wiki_ppl.*close matches: wiki_mc"
    with pytest.raises(LayerwiseError, match=expected):
        evaluate(model, "wiki_mcq", tokenizer=tokenizer, progress=False)


def test_a_standard_task_without_its_data_says_what_to_download(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LayerwiseError) as info:
        evaluate(model, "ppl,arc_easy", tokenizer=tokenizer, progress=False)
    message = str(info.value)
    assert "task arc_easy needs the Hugging Face data set allenai/ai2_arc/ARC-Easy" in message
    assert "HF_DATASETS_OFFLINE=1" in message and "\n" not in message


def test_a_user_task_with_a_missing_data_file(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "mine.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'absent.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
    )
    with pytest.raises(LayerwiseError, match=r"task my_task could not load its data .*mine.yaml"):
        evaluate(model, "my_task", tokenizer=tokenizer, include_path=tmp_path, progress=False)
    with pytest.raises(LayerwiseError, match="task directory .* does not exist"):
        evaluate(model, "my_task", tokenizer=tokenizer, include_path=tmp_path / "nowhere", progress=False)


def test_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(LayerwiseError, match="needs its tokenizer"):
        evaluate(model, "ppl", progress=False)
    with pytest.raises(LayerwiseError, match="batch size"):
        evaluate(model, "ppl", tokenizer=tokenizer, batch_size=0)
    with pytest.raises(LayerwiseError, match="limit must be positive"):
        evaluate(model, "wiki_mc", tokenizer=tokenizer, limit=0)


def test_convert_lm_eval_results():
    out = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                          "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}},
        "n-samples": {"t": {"original": 10, "effective": 4}},
    }
    assert convert_lm_eval_results(out) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict-match": 0.25,
                                                  "exact_match_stderr,strict-match": None, "samples": 4}}


def test_eval_result_reads_the_old_flat_json_and_refuses_others(tmp_path):
    old = {"model": "m", "perplexity": 20.0, "nll": 3.0, "tokens": 10, "windows": 1, "protocol": "p",
           "protocol_description": "d", "seconds": 1.0}
    result = EvalResult.from_dict(old)
    assert result.perplexity == 20.0 and result.results["ppl"]["protocol"] == "p"
    with pytest.raises(LayerwiseError, match="not a layerwise eval result"):
        EvalResult.from_dict({"format": "something"})
    with pytest.raises(LayerwiseError, match="schema version 2"):
        EvalResult.from_dict({"format": FORMAT, "schema_version": 2})
    with pytest.raises(LayerwiseError, match="malformed"):
        EvalResult.from_dict({"format": FORMAT, "schema_version": 1, "results": {"t": 1}})
    path = tmp_path / "r.json"
    result.save(path)
    assert EvalResult.load(path).results == result.results


def test_a_placement_runs_every_forward_on_its_device_in_its_dtype(tiny):
    import torch

    from layerwise.model.adapter import decoder_layers

    model, tokenizer = tiny
    seen = []

    def spy(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).dtype)

    handle = decoder_layers(model)[0].register_forward_pre_hook(spy, with_kwargs=True)
    try:
        placed = evaluate(model, "ppl,wiki_mc", tokenizer=tokenizer, limit=3, batch_size=2, protocol=SMALL,
                          progress=False, device="cpu", dtype="bfloat16")
    finally:
        handle.remove()
    assert len(seen) > 4 and set(seen) == {torch.bfloat16}  # ppl's 4 windows, then lm-eval's requests
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the model itself is untouched
    plain = evaluate(model, "ppl", tokenizer=tokenizer, protocol=SMALL, progress=False)
    assert abs(placed.results["ppl"]["nll"] - plain.results["ppl"]["nll"]) < 0.02 * plain.results["ppl"]["nll"]
    assert 0 <= placed.results["wiki_mc"]["acc"] <= 1
