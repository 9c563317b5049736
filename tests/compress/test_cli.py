"""The CLI end to end on a tiny local model, and every bad input it must refuse cleanly."""

import json

import pytest
import torch

from layerwise.cli import main
from layerwise.core.errors import LayerwiseError

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


def test_score_and_plan_per_module(tiny_model_dir, tmp_path, capsys):
    """`score --granularity module` measures every linear alone; `plan` then gives each its option (overrides
    in the plan JSON), or one per fused set with --granularity fused."""
    scores = tmp_path / "s.json"
    code, _, _ = run("score", tiny_model_dir, "--scorer", "sensitivity", "--options", "2:32,8:32", "--granularity",
                     "module", "--json", scores, *CALIB, capsys=capsys)
    assert code == 0
    measured = json.loads(scores.read_text())["module_damage"]
    assert len(measured) == 4 and "self_attn.v_proj" in measured[0]
    for granularity in ("module", "fused"):
        plan = tmp_path / f"{granularity}.json"
        code, out, _ = run("plan", "--scores", scores, "--bits", 5.0, "--granularity", granularity, "--out", plan,
                           capsys=capsys)
        made = json.loads(plan.read_text())
        assert code == 0 and made["made_by"]["granularity"] == granularity
        assert any(a.get("overrides") for a in made["layers"])
        if granularity == "fused":
            for action in made["layers"]:
                bits = {p: action.get("overrides", {}).get(f"self_attn.{p}_proj", action)["bits"] for p in "qkv"}
                assert len(set(bits.values())) == 1
    with pytest.raises(SystemExit):
        run("plan", "--scores", scores, "--bits", 5.0, "--granularity", "rows", "--out", plan, capsys=capsys)
    assert "invalid choice: 'rows' (choose from 'layer', 'module', 'fused')" in capsys.readouterr().err


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


def run_refused(*argv, capsys) -> str:
    """Run a command argparse refuses: exit code 2, one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as info:
        main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err
    return err


NUMERIC = [  # (command and its required arguments, flag, bad value, what the message says is allowed)
    *[(["compress", "{model}", "--out", "{tmp}/c"], "--bits", v, "a finite number above 0")
      for v in ("nan", "inf", "-inf", "0", "-2", "abc")],
    (["compress", "{model}", "--out", "{tmp}/c"], "--uniform", "5", "one of 2, 3, 4, 8"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--uniform", "nan", "one of 2, 3, 4, 8"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--n-low", "-1", "a whole number of at least 0"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--high", "3.5", "one of 2, 3, 4, 8"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--low", "nan", "one of 2, 3, 4, 8"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--group-size", "0", "a whole number of at least 1"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--seed", "-1", "a whole number of at least 0"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--calib-windows", "0", "a whole number of at least 1"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--calib-len", "1", "a whole number of at least 2"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--prune", "-1", "a whole number of at least 0"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--drop-attn", "-2", "a whole number of at least 0"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--drop-mlp", "nan", "a whole number of at least 0"),
    (["compress", "{model}", "--out", "{tmp}/c"], "--tie", "inf", "a whole number of at least 0"),
    (["plan", "--scores", "{scores}", "--out", "{tmp}/p.json"], "--bits", "inf", "a finite number above 0"),
    (["plan", "--scores", "{scores}", "--out", "{tmp}/p.json"], "--group-size", "-32", "a whole number of at least 1"),
    (["score", "{model}", "--json", "{tmp}/s.json"], "--calib-windows", "nan", "a whole number of at least 1"),
    (["apply", "{model}", "--plan", "{tmp}/p.json", "--out", "{tmp}/c"], "--calib-len", "0",
     "a whole number of at least 2"),
    (["eval", "{model}"], "--batch-size", "0", "a whole number of at least 1"),
    (["eval", "{model}"], "--limit", "nan", "a finite number above 0"),
    (["eval", "{model}"], "--limit", "-1", "a finite number above 0"),
    (["eval", "{model}"], "--num-fewshot", "-1", "a whole number of at least 0"),
    (["eval", "{model}"], "--max-tokens", "0", "a whole number of at least 2"),
    (["eval", "{model}"], "--window", "1", "a whole number of at least 2"),
    (["eval", "{model}"], "--window", "inf", "a whole number of at least 2"),
    (["report", "{model}", "--out", "{tmp}/r"], "--batch-size", "nan", "a whole number of at least 1"),
]


@pytest.mark.parametrize(("argv", "flag", "value", "allowed"), NUMERIC,
                         ids=[f"{a[0]}{f}={v}" for a, f, v, _ in NUMERIC])
def test_bad_numbers_are_one_line_naming_the_flag_and_the_fix(argv, flag, value, allowed, tiny_model_dir,
                                                              scores_file, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=tiny_model_dir, scores=scores_file) for a in argv]
    err = run_refused(*argv, f"{flag}={value}", capsys=capsys)  # = : argparse reads -inf as a flag otherwise
    assert err.startswith(f"layerwise {argv[0]}: error: argument {flag}: must be {allowed}, got {value!r}; e.g. "
                          f"{flag} ")
    assert err.rstrip().endswith(f"(see layerwise {argv[0]} --help)")
    assert list(tmp_path.iterdir()) == []


def test_other_usage_errors_are_one_line_too(capsys):
    assert "the following arguments are required: --out" in run_refused("compress", capsys=capsys)
    assert "invalid choice: 'nope'" in run_refused("nope", capsys=capsys)


PLACED = [["score", "{tmp}/m", "--json", "{tmp}/s.json"], ["apply", "{tmp}/m", "--plan", "{tmp}/p.json", "--out",
          "{tmp}/c"], ["compress", "{tmp}/m", "--out", "{tmp}/c"], ["eval", "{tmp}/m"]]
BAD_PLACEMENT = [
    (["--device", "cuda"], "device 'cuda': CUDA is not available ("),
    (["--device", "cuda:1"], "device 'cuda:1': CUDA is not available ("),
    (["--device", "gpu"], "unknown device 'gpu' (did you mean cuda?)"),
    (["--device", "tpu"], "unknown device 'tpu'; choose one of auto, cpu, cuda, cuda:N"),
    (["--dtype", "float16"], "dtype float16 is refused on the CPU"),
    (["--device", "cpu", "--dtype", "int8"], "unknown dtype 'int8'; choose one of float32, bfloat16, float16"),
]


@pytest.mark.parametrize("command", PLACED, ids=[c[0] for c in PLACED])
@pytest.mark.parametrize(("flags", "message"), BAD_PLACEMENT, ids=[" ".join(f) for f, _ in BAD_PLACEMENT])
def test_bad_device_or_dtype_refused_first(command, flags, message, tmp_path, capsys, monkeypatch):
    """Refused at the very start: the model named does not even exist, and that is not what is said."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv = [a.format(tmp=tmp_path) for a in command]
    code, out, err = run(*argv, *flags, capsys=capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"layerwise: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("command", "target"), [("score", "layerwise.api.score"), ("apply", "layerwise.api.apply"),
                                                 ("compress", "layerwise.api.compress"),
                                                 ("eval", "layerwise.eval.evaluate")])
@pytest.mark.parametrize(("flags", "cuda", "expected"), [
    ([], False, {"device": torch.device("cpu"), "dtype": torch.float32}),
    (["--device", "cpu", "--dtype", "fp32"], True, {"device": torch.device("cpu"), "dtype": torch.float32}),
    (["--dtype", "bfloat16"], False, {"device": torch.device("cpu"), "dtype": torch.bfloat16}),
    ([], True, {"device": torch.device("cuda"), "dtype": torch.float32}),  # the tiny model's config says float32
    (["--device", "cuda:1", "--dtype", "fp16"], True, {"device": torch.device("cuda", 1), "dtype": torch.float16}),
], ids=["default", "cpu-fp32", "bf16", "auto-gpu", "cuda1-fp16"])
def test_device_and_dtype_are_resolved_and_passed_on(command, target, flags, cuda, expected,
                                                                  tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2 if cuda else 0)
    seen = {}

    def fake(*args, **kwargs):
        seen.update({k: v for k, v in kwargs.items() if k in ("device", "dtype")})
        raise LayerwiseError("stopped here")

    monkeypatch.setattr(target, fake)
    monkeypatch.setattr("layerwise.model.loading.load_model", lambda *a, **k: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr("layerwise.engine.applier.check_plan_fits", lambda *a: None)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"format": "layerwise.plan", "version": 1,
                                "layers": [{"layer": 0, "action": "keep"}]}))
    argv = {"score": ["--json", tmp_path / "s.json"], "apply": ["--plan", plan, "--out", tmp_path / "c"],
            "compress": ["--out", tmp_path / "c"], "eval": []}[command]
    code, _, err = run(command, tiny_model_dir, *argv, *flags, capsys=capsys)
    assert code == 2 and "stopped here" in err
    assert seen == expected


def test_device_cpu_and_dtype_float32_run_as_before(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code, _, err = run("compress", tiny_model_dir, "--method", "rtn", "--uniform", 4, "--group-size", 32,
                       "--device", "cpu", "--dtype", "float32", "--out", ckpt, capsys=capsys)
    assert code == 0, err
    assert json.loads((ckpt / "layerwise.json").read_text())["dtype"] == "float32"


def test_bf16_on_the_cpu_runs_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    code, out, _ = run("compress", tiny_model_dir, "--method", "rtn", "--uniform", 4, "--group-size", 32,
                       "--dtype", "bf16", "--out", tmp_path / "c", capsys=capsys)
    assert code == 0 and "wrote" in out
    assert json.loads((tmp_path / "c" / "layerwise.json").read_text())["dtype"] == "bfloat16"
