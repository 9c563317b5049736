"""`layerwise eval --tasks` and `layerwise report` end to end on a tiny model, and their refusals."""

from __future__ import annotations

import json
import sys

import pytest
from eval_helpers import SMALL_PPL, load_tiny, use_private_cache

import layerwise
from layerwise.cli import main
from layerwise.eval.wiki_tasks import prepare_task_dir


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    return use_private_cache(tmp_path / "cache", monkeypatch)


def run(*argv, capsys):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """A mixed 4/2-bit checkpoint planned from LIM scores, and one with a pruned, a tied and a dropped part."""
    import torch

    root = tmp_path_factory.mktemp("ckpts")
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model, tokenizer = load_tiny(tiny_model_dir)
    mixed = layerwise.compress(model, bits=3.5, scorer="lim", method="rtn", group_size=32, high=4, low=2,
                               calib=windows, tokenizer=tokenizer, progress=False)
    layerwise.save(mixed, root / "mixed")
    model, tokenizer = load_tiny(tiny_model_dir)
    structural = layerwise.compress(model, bits=None, uniform=4, method="rtn", group_size=32, prune=1,
                                    prune_scorer="lim", tie=1, drop_attn=1, calib=windows, tokenizer=tokenizer,
                                    progress=False)
    layerwise.save(structural, root / "structural")
    return root / "mixed", root / "structural"


def test_eval_tasks_writes_schema_json(tiny_model_dir, tmp_path, capsys):
    out_file = tmp_path / "r.json"
    code, out, _ = run("eval", tiny_model_dir, "--tasks", "ppl,wiki_mc", "--limit", 3, *SMALL_PPL,
                       "--json", out_file, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("perplexity: ") and lines[1].startswith("protocol: ") and lines[2].startswith("tokens: ")
    assert lines[3].startswith("wiki_mc: acc ") and "[3 docs]" in lines[3]
    data = json.loads(out_file.read_text())
    assert data["format"] == "layerwise.eval" and data["schema_version"] == 1
    assert 0 <= data["results"]["wiki_mc"]["acc"] <= 1
    assert data["results"]["ppl"]["tokens"] == 4 * 63
    assert data["model"] == str(tiny_model_dir) and data["config"]["model_info"]["kind"] == "model"


def _broken_task_data(tmp_path):
    path = prepare_task_dir()
    (path / "wiki_mc.jsonl").write_text("not json\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{model}", "--tasks", "ppl,nonexistent_task", "--json", "{tmp}/r.json"],
         "unknown task(s) 'nonexistent_task'"),
        (["eval", "{tmp}/plain", "--tasks", "ppl", "--json", "{tmp}/r.json"],
         "is not a Hugging Face model (no config.json) nor a layerwise checkpoint (no layerwise.json)"),
        (["eval", "{model}", "--tasks", "wiki_mc", "--json", "{tmp}/r.json"], "wiki_mc.jsonl is malformed"),
        (["eval", "{model}", "--tasks", "wiki_mc", "--json", "{tmp}/r.json"], "pip install 'layerwise[eval]'"),
        (["report", "{model}", "{tmp}/plain", "--out", "{tmp}/rep"], "nor a layerwise checkpoint"),
        (["report", "{model}", "--results", "{tmp}/other.json", "--out", "{tmp}/rep"],
         "are for model 'elsewhere', which is not among the inputs"),
        (["report", "{model}", "--out", "{tmp}/plain"], "already exists"),
        (["report", "{model}", "--tasks", "nonexistent_task", "--out", "{tmp}/rep"], "unknown task(s)"),
    ],
    ids=["unknown-task", "not-a-model", "task-data-malformed", "no-lm-eval", "report-not-a-model",
         "report-foreign-results", "report-out-exists", "report-unknown-task"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tiny_model_dir, tmp_path, capsys,
                                                         monkeypatch, request, private_cache):
    (tmp_path / "plain").mkdir()
    (tmp_path / "other.json").write_text(json.dumps({"format": "layerwise.eval", "schema_version": 1,
                                                     "model": "elsewhere", "results": {}}))
    if request.node.callspec.id == "task-data-malformed":
        _broken_task_data(tmp_path)
    if request.node.callspec.id == "no-lm-eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # what the setup printed
    code, _, err = run(*[a.format(tmp=tmp_path, model=tiny_model_dir) for a in argv], capsys=capsys)
    assert code == 2
    assert message in err
    assert err.startswith("layerwise: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_report_compares_the_original_and_checkpoints(tiny_model_dir, checkpoints, tmp_path, capsys):
    mixed, structural = checkpoints
    out = tmp_path / "report"
    code, stdout, _ = run("report", tiny_model_dir, mixed, structural, "--tasks", "ppl,wiki_mc", "--limit", 4,
                          *SMALL_PPL, "--out", out, capsys=capsys)
    assert code == 0 and f"wrote {out}" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(layerwise.eval.comparison.FILES)
    for png in ("per_layer.png", "ppl_vs_size.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (out / "report.md").read_text()
    assert "| model | kind | size (MiB) | avg bits | ppl ↓ | wiki_mc acc ↑ |" in md
    for name, kind in ((tiny_model_dir.name, "model"), ("mixed", "checkpoint"), ("structural", "checkpoint")):
        assert f"| {name} | {kind} |" in md
    assert "## Per-layer plan" in md and "score (lim)" in md
    assert "pruned" in md and "tied to" in md and "attn dropped" in md and "4b g32 rtn" in md
    data = json.loads((out / "results.json").read_text())
    assert data["format"] == "layerwise.report" and data["schema_version"] == 1
    entries = {e["name"]: e for e in data["inputs"]}
    assert entries[tiny_model_dir.name]["avg_bits"] == 16.0 and entries[tiny_model_dir.name]["layers"] == []
    assert entries["mixed"]["avg_bits"] <= 3.5 and {layer["bits"] for layer in entries["mixed"]["layers"]} == {2, 4}
    assert [layer["action"] for layer in entries["structural"]["layers"]].count("prune") == 1
    assert all(e["eval"]["results"]["ppl"]["perplexity"] > 1 for e in data["inputs"])
    assert entries["mixed"]["size_bytes"] < entries[tiny_model_dir.name]["size_bytes"]


def test_report_reuses_results_files(tiny_model_dir, checkpoints, tmp_path, capsys, monkeypatch):
    mixed, _ = checkpoints
    saved = tmp_path / "mixed.json"
    assert run("eval", mixed, *SMALL_PPL, "--json", saved, capsys=capsys)[0] == 0
    evaluated = []
    from layerwise.eval.harness import Evaluator

    original_call = Evaluator.__call__

    def counting(self, model=None, **kwargs):
        evaluated.append(model)
        return original_call(self, model, **kwargs)

    monkeypatch.setattr(Evaluator, "__call__", counting)
    entries = layerwise.eval.report([tiny_model_dir, mixed], tmp_path / "rep", results=[saved],
                                    protocol=layerwise.eval.PerplexityProtocol("p", max_tokens=256, window_len=64),
                                    progress=False)
    assert evaluated == [str(tiny_model_dir)]
    assert entries[1].eval.to_dict() == json.loads(saved.read_text())
