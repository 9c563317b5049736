"""Faults and bad input (docs/faults.md): each refused with one clear line, nothing half-written under the
output's name, and the input model left exactly as it was.

Full and read-only filesystems are simulated where they cannot be made (tests may run as root, where
chmod does not stop writes): the write raises the OSError (or safetensors' SafetensorError) the kernel
would give. One test makes a real write fail, through a file size limit (ulimit -f) in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError

UNIFORM = ["--method", "rtn", "--uniform", "4", "--group-size", "32"]  # the quickest compress: no calibration


def run(*argv, capsys):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` with its SHA-256: equal before and after means nothing was modified."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def listing(parent: Path) -> list[str]:
    """Names in `parent`, hidden ones included (a temporary left behind would show here)."""
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A private copy of the tiny llama directory, free to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def out_parent(tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model("llama", n_layers=4)
    result = layerwise.compress(model, 3.0, scorer="lim", method="rtn", calib=random_windows(2, 16),
                                group_size=32, progress=False)
    return Path(layerwise.save(result, tmp_path / "ckpt"))


# ------------------------------------------------------------------------------------------------ input model


def test_successful_compress_leaves_the_input_untouched(model_dir, out_parent, capsys):
    before = digest(model_dir)
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 0, err
    assert digest(model_dir) == before
    assert listing(out_parent) == ["ckpt"]


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda data: data[: len(data) // 2], "incomplete metadata"),  # truncated: a copy cut short
        (lambda data: data[:-1], "incomplete metadata"),
        (lambda data: b"\xff" * 8 + data[8:], "header too large"),  # the header length overwritten
        (lambda data: b"", "header too small"),
    ],
    ids=["half", "last-byte", "header", "empty"],
)
def test_damaged_input_weights_are_named(damage, detail, model_dir, out_parent, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    before = digest(model_dir)
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err)
    assert "cannot read model.safetensors" in err and detail in err and "truncated or damaged" in err
    assert digest(model_dir) == before and listing(out_parent) == []


def _rewrite_input(model_dir: Path, change) -> None:
    weights = model_dir / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    change(state)
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})


def test_input_tensor_of_wrong_shape_is_named(model_dir, out_parent, capsys):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_input(model_dir, lambda state: state.__setitem__(name, torch.zeros(3, 3)))
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err)
    assert f"tensor {name} has shape (3, 3) but config.json needs (128, 64)" in err
    assert listing(out_parent) == []


def test_input_missing_tensor_is_named_not_randomly_filled(model_dir, out_parent, capsys):
    """transformers would initialise a missing tensor at random and only log it."""
    name = "model.layers.2.self_attn.o_proj.weight"
    _rewrite_input(model_dir, lambda state: state.pop(name))
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err)
    assert f"lack tensors {name}" in err and "incomplete" in err
    assert listing(out_parent) == []


def _poison(state: dict[str, torch.Tensor]) -> None:
    state["model.layers.1.self_attn.q_proj.weight"][0, :3] = float("nan")
    state["model.layers.3.mlp.down_proj.weight"][5, 7] = float("inf")


@pytest.mark.parametrize("eval_flag", [["--eval"], []], ids=["eval", "no-eval"])
def test_nan_and_inf_input_weights_are_refused_before_any_work(eval_flag, model_dir, out_parent, capsys,
                                                               monkeypatch):
    _rewrite_input(model_dir, _poison)
    before = digest(model_dir)

    def no_slow_work(*args, **kwargs):
        raise AssertionError("the slow steps ran before the weights were checked")

    monkeypatch.setattr("layerwise.cli._perplexity", no_slow_work)
    monkeypatch.setattr("layerwise.engine.pipeline.calibration_windows", no_slow_work)
    code, _, err = run("compress", model_dir, *eval_flag, "--method", "rtn", "--scorer", "lim", "--bits", "3",
                       "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err)
    assert "model.layers.1.self_attn.q_proj.weight (3 NaN, 0 Inf)" in err
    assert "model.layers.3.mlp.down_proj.weight (0 NaN, 1 Inf)" in err
    assert digest(model_dir) == before and listing(out_parent) == []


def test_nan_weights_refused_by_the_api(monkeypatch):
    model = tiny_model("qwen2", n_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[4, 4] = float("-inf")
    monkeypatch.setattr("layerwise.engine.pipeline.calibration_windows",
                        lambda *a, **k: pytest.fail("calibrated first"))
    with pytest.raises(LayerwiseError, match=r"embed_tokens.weight \(0 NaN, 1 Inf\).*repair or re-export"):
        layerwise.compress(model, 3.0, scorer="lim", method="rtn", calib="pydoc", progress=False)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_truncated_checkpoint_weights_refused_by_load_and_eval(ckpt, capsys):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = digest(ckpt)
    with pytest.raises(LayerwiseError, match=r"model.safetensors cannot be read .*incomplete metadata.*damaged"):
        layerwise.load(ckpt)
    code, _, err = run("eval", ckpt, "--max-tokens", 64, "--window", 32, capsys=capsys)
    assert code == 2 and one_line(err) and "model.safetensors cannot be read" in err
    assert digest(ckpt) == before


def test_corrupted_checkpoint_header_refused(ckpt):
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00" * 8  # the JSON header's first bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(LayerwiseError, match="model.safetensors cannot be read"):
        layerwise.load(ckpt)


def _edit_meta(ckpt: Path, change) -> None:
    path = ckpt / "layerwise.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_unknown_format_version_refused_by_eval(ckpt, capsys):
    _edit_meta(ckpt, lambda meta: meta.__setitem__("format_version", 99))
    code, _, err = run("eval", ckpt, "--max-tokens", 64, "--window", 32, capsys=capsys)
    assert code == 2 and one_line(err)
    assert "version 99 is unknown" in err and "reads layerwise.checkpoint versions 1 and 2" in err


def test_plan_that_does_not_match_the_weights_names_the_tensor(ckpt):
    def double_first_layer_bits(meta):
        layer = meta["plan"]["layers"][0]
        layer["bits"] = 4 if layer["bits"] == 2 else 2

    _edit_meta(ckpt, double_first_layer_bits)
    with pytest.raises(LayerwiseError, match=r"tensor model\.layers\.0\.\S+ has shape \(\d+, \d+\), the plan needs"):
        layerwise.load(ckpt)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda meta: meta.pop("plan"), "has no plan"),
        (lambda meta: meta["plan"].__setitem__("layers", [{"layer": 0, "action": "shrink"}]), "malformed|unknown"),
        (lambda meta: meta.__setitem__("dtype", "float99"), "not a torch dtype"),
    ],
    ids=["no-plan", "bad-action", "bad-dtype"],
)
def test_damaged_metadata_is_refused_with_the_file_named(ckpt, change, message):
    _edit_meta(ckpt, change)
    with pytest.raises(LayerwiseError, match=rf"layerwise\.json.*({message})"):
        layerwise.load(ckpt)


def test_missing_config_is_refused(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(LayerwiseError, match=r"config\.json cannot be read"):
        layerwise.load(ckpt)


# ------------------------------------------------------------------------------------------------ output


def _partial_then(exc: BaseException):
    """A stand-in for safetensors' save_file that writes half a file, then fails as `exc`."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 1000)
        raise exc

    return save_file


FULL = [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


@pytest.mark.parametrize("exc", FULL, ids=["oserror", "safetensor-error"])
def test_full_filesystem_mid_write(exc, model_dir, out_parent, capsys, monkeypatch):
    before = digest(model_dir)
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then(exc))
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err)
    assert "the filesystem is full" in err and "nothing was written under" in err
    assert listing(out_parent) == []  # neither the output nor its hidden temporary
    assert digest(model_dir) == before


def test_full_filesystem_keeps_the_checkpoint_being_overwritten(ckpt, monkeypatch):
    before = digest(ckpt)
    result = layerwise.compress(tiny_model("llama", n_layers=4), None, uniform=4, group_size=32, method="rtn",
                                progress=False)
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then(FULL[0]))
    with pytest.raises(LayerwiseError, match="the filesystem is full"):
        layerwise.save(result, ckpt, overwrite=True)
    assert digest(ckpt) == before and listing(ckpt.parent) == ["ckpt"]


def test_read_only_output_refused_before_any_work(model_dir, out_parent, capsys, monkeypatch):
    real_access = os.access
    if os.geteuid() == 0:  # root writes through chmod; say what a read-only mount says instead
        def access(path, mode, **kwargs):
            return False if Path(path) == out_parent else real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    else:
        out_parent.chmod(0o555)
    monkeypatch.setattr("layerwise.model.loading.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    try:
        code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "new" / "ckpt", capsys=capsys)
    finally:
        out_parent.chmod(0o755)
    assert code == 2 and one_line(err)
    assert f"cannot write {out_parent / 'new' / 'ckpt'}: {out_parent} is " in err
    assert listing(out_parent) == []


def test_read_only_filesystem_at_save(model_dir, out_parent, capsys, monkeypatch):
    """The mount turned read-only (or the permissions changed) while compressing."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == out_parent:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err) and "the filesystem is read-only" in err
    assert listing(out_parent) == []


def test_real_write_failure_file_size_limit(tiny_model_dir, out_parent):
    """A real failed write, not a simulated one: ulimit -f below the size of model.safetensors."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from layerwise.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
        sys.exit(main({["--quiet", "compress", str(tiny_model_dir), *UNIFORM, "--out", str(out_parent / "ckpt")]!r}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=out_parent)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "file size limit" in done.stderr and one_line(done.stderr)
    assert listing(out_parent) == []


def test_keyboard_interrupt_during_save(model_dir, out_parent, capsys, monkeypatch):
    before = digest(model_dir)
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then(KeyboardInterrupt()))
    code, _, err = run("compress", model_dir, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 130 and one_line(err) and "interrupted" in err
    assert listing(out_parent) == []
    assert digest(model_dir) == before


def test_temporary_of_a_killed_run_is_removed_by_the_next(out_parent):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now belongs to no process (pid reuse within this test is vanishingly unlikely)
    stale = out_parent / f".ckpt.tmp-{dead.pid}"
    live = out_parent / f".ckpt.tmp-{os.getppid()}"  # another run still writing: left alone
    for path in (stale, live):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    result = layerwise.compress(tiny_model("llama", n_layers=2), None, uniform=4, group_size=32, method="rtn",
                                progress=False)
    layerwise.save(result, out_parent / "ckpt")
    assert listing(out_parent) == sorted([live.name, "ckpt"])


def test_interrupted_swap_puts_the_old_checkpoint_back(ckpt, monkeypatch):
    before = digest(ckpt)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory moving into place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    result = layerwise.compress(tiny_model("llama", n_layers=4), None, uniform=4, group_size=32, method="rtn",
                                progress=False)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        layerwise.save(result, ckpt, overwrite=True)
    assert digest(ckpt) == before and listing(ckpt.parent) == ["ckpt"]


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_text_shorter_than_one_window(model_dir, out_parent, tmp_path, capsys):
    from transformers import AutoTokenizer

    text = tmp_path / "short.txt"
    text.write_text("A few words of calibration text, far fewer than one window.")
    n_tokens = len(AutoTokenizer.from_pretrained(model_dir)(text.read_text(), add_special_tokens=False)["input_ids"])
    assert n_tokens < 64
    code, _, err = run("compress", model_dir, "--method", "rtn", "--scorer", "lim", "--bits", "3",
                       "--group-size", "32", "--calib", text, "--calib-len", "64", "--out", out_parent / "ckpt",
                       capsys=capsys)
    assert code == 2 and one_line(err)
    assert f"calibration text {text}: the text has {n_tokens} tokens, fewer than one window of 64 tokens" in err
    assert listing(out_parent) == []


# ------------------------------------------------------------------------------------------------ architecture


def test_encoder_only_directory_names_what_it_is(tmp_path, out_parent, capsys):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=64)).save_pretrained(bert)
    capsys.readouterr()  # save_pretrained's progress bar
    before = digest(bert)
    code, _, err = run("compress", bert, *UNIFORM, "--out", out_parent / "ckpt", capsys=capsys)
    assert code == 2 and one_line(err)
    assert "'bert' model (saved as BertForMaskedLM)" in err and "decoder-only causal LMs" in err
    assert digest(bert) == before and listing(out_parent) == []


def test_causal_model_without_findable_decoder_layers_names_the_paths_tried():
    model = tiny_model("llama", n_layers=2)
    model.model.blocks = model.model.layers  # a layout layerwise does not know, with two candidate lists
    del model.model.layers
    model.model.adapters = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    with pytest.raises(LayerwiseError, match=r"cannot find the decoder layers of LlamaForCausalLM: no ModuleList "
                                             r"at model\.layers.*2 candidates of length 2.*LAYER_PATHS"):
        layerwise.compress(model, 3.0, scorer="lim", method="rtn", calib=random_windows(1, 8), progress=False)


def test_full_filesystem_writing_a_json_output(tmp_path, monkeypatch):
    """Plans, scores and eval results go through one atomic JSON writer, with the same message."""
    from layerwise.core.types import LayerAction, Plan

    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".plan.json.tmp-"):
            real_write_text(self, "{", **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(LayerwiseError, match="cannot write .*plan.json: the filesystem is full"):
        Plan([LayerAction(0, "keep")]).save(tmp_path / "plan.json")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------- output inside the input


def tree(root: Path) -> dict[str, str]:
    """`digest` of everything under `root`, hidden files and directories included (empty ones as "dir")."""
    return {**{str(p.relative_to(root)): "dir" for p in root.rglob("*") if p.is_dir()}, **digest(root)}


@pytest.fixture(scope="module")
def shared_ckpt(tmp_path_factory):
    model = tiny_model("llama", n_layers=4)
    result = layerwise.compress(model, None, uniform=4, method="rtn", group_size=32, progress=False)
    return Path(layerwise.save(result, tmp_path_factory.mktemp("shared") / "ckpt"))


@pytest.fixture
def overlap_inputs(model_dir, shared_ckpt, tmp_path, monkeypatch):
    """A model, a checkpoint, scores, a plan, the default model's cache directory and a symlink to the model."""
    from layerwise.core.cache import ENV_VAR
    from layerwise.core.types import LayerAction, LayerScores, Plan

    shutil.copytree(shared_ckpt, tmp_path / "ckpt")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    default = tmp_path / "cache" / "models" / "smollm2-135m"
    default.mkdir(parents=True)
    (default / "config.json").write_text("{}")
    LayerScores("lim", [0.1, 0.2, 0.3, 0.4], [{"q": (64, 64)}] * 4).save(tmp_path / "scores.json")
    Plan([LayerAction(i, "quantize", 4, 32) for i in range(4)]).save(tmp_path / "plan.json")
    (tmp_path / "link").symlink_to(model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("layerwise.model.loading.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    return tmp_path


OVERLAPS = [  # argv (paths relative to the test's directory), what the message says
    (["compress", "model", *UNIFORM, "--out", "model", "--overwrite"], "output model is the input model"),
    (["compress", "model", *UNIFORM, "--out", "model/compressed"],
     "output model/compressed lies inside the input model"),
    (["compress", "model", *UNIFORM, "--out", ".", "--overwrite"], "output . contains the input model"),
    (["compress", "link", *UNIFORM, "--out", "model", "--overwrite"], "output model is the input model"),
    (["compress", "model", *UNIFORM, "--out", "link", "--overwrite"], "output link is the input model"),
    (["compress", "model", *UNIFORM, "--out", "model/../model", "--overwrite"], "is the input model"),
    (["compress", *UNIFORM, "--out", "cache/models/smollm2-135m", "--overwrite"], "is the input model"),
    (["compress", "smollm2-135m", *UNIFORM, "--out", "cache", "--overwrite"], "contains the input model"),
    (["apply", "model", "--plan", "plan.json", "--out", "model", "--overwrite"], "is the input model"),
    (["apply", "model", "--plan", "plan.json", "--out", "plan.json", "--overwrite"], "is the input plan file"),
    (["score", "model", "--json", "model/config.json", "--overwrite"], "lies inside the input model"),
    (["score", "model", "--json", "model/scores.json"], "lies inside the input model"),
    (["plan", "--scores", "scores.json", "--bits", "3", "--out", "scores.json", "--overwrite"],
     "is the input scores file"),
    (["export", "ckpt", "--out", "ckpt", "--overwrite"], "is the input checkpoint"),
    (["export", "ckpt", "--out", "ckpt/hf"], "lies inside the input checkpoint"),
    (["eval", "ckpt", "--json", "ckpt/layerwise.json", "--overwrite"], "lies inside the input model or checkpoint"),
    (["report", "model", "ckpt", "--out", "ckpt", "--overwrite"], "is the input model or checkpoint"),
    (["report", "model", "--results", "scores.json", "--out", "scores.json", "--overwrite"],
     "is the input results file"),
]


@pytest.mark.parametrize(("argv", "message"), OVERLAPS, ids=[" ".join(a[:1] + a[a.index(next(
    f for f in a if f in ("--out", "--json"))):]) for a, _ in OVERLAPS])
def test_output_overlapping_an_input_is_refused_even_with_overwrite(argv, message, overlap_inputs, capsys):
    before = tree(overlap_inputs)
    code, out, err = run(*argv, capsys=capsys)
    assert code == 2 and out == "" and one_line(err), err
    assert message in err and "choose an output path outside" in err
    assert tree(overlap_inputs) == before  # inputs unchanged, nothing new written anywhere


def test_output_beside_the_input_is_fine(overlap_inputs, capsys, monkeypatch):
    monkeypatch.undo()  # the real loader
    code, _, err = run("compress", overlap_inputs / "model", *UNIFORM, "--out", overlap_inputs / "model-4bit",
                       capsys=capsys)
    assert code == 0, err


def test_api_refuses_outputs_overlapping_the_input(model_dir, ckpt, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerwise.eval import report
    from layerwise.output.export import export_checkpoint

    before = tree(tmp_path)
    with pytest.raises(LayerwiseError, match="is the input model"):
        layerwise.compress(str(model_dir), None, uniform=4, method="rtn", out=model_dir, overwrite=True)
    with pytest.raises(LayerwiseError, match="is the input checkpoint"):
        export_checkpoint(ckpt, ckpt, "hf", overwrite=True)
    with pytest.raises(LayerwiseError, match="contains the input model or checkpoint"):
        report([ckpt], tmp_path, overwrite=True)
    assert tree(tmp_path) == before
    # save() knows the input from the model's config (_name_or_path) and from the report
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = layerwise.compress(model, None, uniform=4, method="rtn", group_size=32,
                                tokenizer=AutoTokenizer.from_pretrained(model_dir), progress=False)
    with pytest.raises(LayerwiseError, match="lies inside the input model"):
        layerwise.save(result, model_dir / "ckpt")
    result = layerwise.compress(str(model_dir), None, uniform=4, method="rtn", group_size=32, progress=False)
    with pytest.raises(LayerwiseError, match="is the input model"):
        layerwise.save(result, model_dir, overwrite=True)
    assert tree(tmp_path) == before
