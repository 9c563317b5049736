"""The CLI end to end on a tiny local model, and every bad input it must refuse cleanly."""

import json

import pytest

from layerwise.cli import main

CALIB = ["--calib", "pydoc", "--calib-windows", "4", "--calib-len", "32"]


def run(*argv, capsys):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def scores_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    assert main(["--quiet", "score", str(tiny_model_dir), "--scorer", "lim", "--json", str(path), *CALIB]) == 0
    return path


def test_score_plan_apply_eval(tiny_model_dir, scores_file, tmp_path, capsys):
    scores = json.loads(scores_file.read_text())
    assert scores["scorer"] == "lim" and len(scores["scores"]) == 4
    plan = tmp_path / "plan.json"
    code, out, _ = run("plan", "--scores", scores_file, "--bits", 4.0, "--group-size", 32, "--out", plan,
                       capsys=capsys)
    assert code == 0 and "average bits" in out
    assert {a["bits"] for a in json.loads(plan.read_text())["layers"]} == {2, 4}
    ckpt = tmp_path / "ckpt"
    code, out, _ = run("apply", tiny_model_dir, "--plan", plan, "--method", "rtn", "--out", ckpt, capsys=capsys)
    assert code == 0 and (ckpt / "layerwise.json").is_file() and "rel.err" in out
    res = tmp_path / "res.json"
    code, out, _ = run("eval", ckpt, "--max-tokens", 256, "--window", 64, "--json", res, capsys=capsys)
    assert code == 0
    result = json.loads(res.read_text())["results"]["ppl"]
    assert result["perplexity"] > 1 and result["tokens"] == 4 * 63 and result["protocol"]


def test_compress_one_step(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code, out, _ = run("compress", tiny_model_dir, "--method", "rtn", "--bits", 7.0, "--high", 8, "--low", 4,
                       "--group-size", 32,
                       "--scorer", "zd", "--out", ckpt, capsys=capsys)
    assert code == 0
    meta = json.loads((ckpt / "layerwise.json").read_text())
    assert meta["plan"]["made_by"]["scorer"] == "zd" and meta["report"]["avg_bits"] <= 7.0
    assert {a["method"] for a in meta["plan"]["layers"]} == {"rtn"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "{tmp}/missing-model", "--json", "{tmp}/s.json"], "does not exist"),
        (["score", "{model}", "--scorer", "nope", "--json", "{tmp}/s.json"], "unknown scorer 'nope'"),
        (["compress", "{model}", "--method", "nope", "--out", "{tmp}/c"], "unknown quantization method"),
        (["compress", "{model}", "--planner", "nope", "--out", "{tmp}/c"], "unknown planner"),
        (["plan", "--scores", "{scores}", "--bits", "1.5", "--out", "{tmp}/p.json"], "below what 2-bit"),
        (["plan", "--scores", "{scores}", "--bits", "6", "--out", "{tmp}/p.json"], "above the high width"),
        (["plan", "--scores", "{tmp}/none.json", "--bits", "3", "--out", "{tmp}/p.json"], "does not exist"),
        (["compress", "{model}", "--calib", "{tmp}/empty.txt", "--out", "{tmp}/c"], "is empty"),
        (["compress", "{model}", "--calib", "{tmp}/short.txt", "--out", "{tmp}/c"], "tokens"),
        (["compress", "{model}", "--calib", "{tmp}/nofile.txt", "--out", "{tmp}/c"], "nofile.txt"),
        (["compress", "{model}", "--out", "{tmp}/exists"], "already exists"),
        (["apply", "{model}", "--plan", "{tmp}/plan3.json", "--out", "{tmp}/c"], "plan covers 3 layers"),
        (["eval", "{tmp}/exists"], "is not a Hugging Face model"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(argv, message, tiny_model_dir, scores_file, tmp_path,
                                                          capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "exists").mkdir()
    layers = [{"layer": i, "action": "quantize", "bits": 4, "group_size": 32} for i in range(3)]
    (tmp_path / "plan3.json").write_text(json.dumps({"format": "layerwise.plan", "version": 1, "layers": layers}))
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(tmp=tmp_path, model=tiny_model_dir, scores=scores_file) for a in argv]
    code, _, err = run(*argv, *(CALIB if argv[0] == "compress" and "--calib" not in argv else []), capsys=capsys)
    assert code == 2
    assert message in err
    assert err.startswith("layerwise: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_not_a_causal_lm_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=64)).save_pretrained(tmp_path / "bert")
    code, _, err = run("score", tmp_path / "bert", "--json", tmp_path / "s.json", capsys=capsys)
    assert code == 2 and "decoder-only" in err
    assert not (tmp_path / "s.json").exists()
