"""Runs over several processes (torch.distributed, gloo, on the CPU): the same checkpoint and perplexity as one
process, refusals and failures reported once for the group, nothing written after a failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import layerwise
from layerwise.core import dist
from layerwise.engine.streaming import KILL_ENV, partial_dir
from layerwise.model.adapter import decoder_layers, linear_modules

CALIB = ["--calib", "pydoc", "--calib-windows", "8", "--calib-len", "32"]
COMPRESS = ["--bits", "3.25", "--options", "2:32,3:32,4:32,8:32", "--method", "gptq", *CALIB]
# Runs layerwise's command line after an optional fault set up on one rank (see `launch`).
RUNNER = """
import os, signal, sys
from layerwise.cli import main
import layerwise.engine.applier as applier
rank, fault = int(os.environ["RANK"]), os.environ.get("FAULT_RANK_ACTION", "")
if fault and rank == int(fault.split(":")[0]):
    action = fault.split(":")[1]
    original = applier.collect_hessians

    def collect_hessians(step, modules):
        if step.index == 2:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        return original(step, modules)

    applier.collect_hessians = collect_hessians
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `layerwise.compress` called in a process group the caller initialised.
API_RUNNER = """
import sys
import torch.distributed
import layerwise
torch.distributed.init_process_group("gloo")
result = layerwise.compress(sys.argv[1], 3.25, options="2:32,3:32,4:32,8:32", method="gptq", calib="pydoc",
                            calib_windows=8, calib_len=32, out=sys.argv[2], progress=False)
print(result.plan.avg_bits, [a.bits for a in result.plan.layers])
"""


def launch(argvs: list[list[str]], fault: str = "", timeout: int = 240, script: str | None = None,
           env_by_rank: dict[int, dict[str, str]] | None = None) -> list[subprocess.CompletedProcess]:
    """One process per argv, as torchrun would start them (RANK, WORLD_SIZE, ...), each with one thread."""
    port = free_port()
    procs = []
    for rank, argv in enumerate(argvs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(argvs)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "FAULT_RANK_ACTION": fault, **(env_by_rank or {}).get(rank, {})}
        command = [sys.executable, "-c", RUNNER, "--quiet"] if script is None else [sys.executable, "-c", script]
        procs.append(subprocess.Popen([*command, *map(str, argv)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def errors(results: list[subprocess.CompletedProcess]) -> list[str]:
    return [line for r in results for line in r.stderr.splitlines() if line.startswith("layerwise: error")]


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    model = layerwise.load(path).model
    return {f"{i}.{name}": module.dequantize() for i, layer in enumerate(decoder_layers(model))
            for name, module in linear_modules(layer).items()}


def test_two_ranks_write_the_checkpoint_of_one(tiny_model_dir, tmp_path):
    """Calibration windows dealt over 2 gloo ranks, Hessians, Fisher sums and damages summed in rank order:
    the same plan as one process, weights equal within rounding (stated: relative difference below 1e-3 per
    module; on this model they are byte-identical), written once by rank 0, printed once."""
    one = launch([["compress", tiny_model_dir, *COMPRESS, "--out", tmp_path / "one"]])
    two = launch([["compress", tiny_model_dir, *COMPRESS, "--out", tmp_path / "two"]] * 2)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr[-2000:] for r in one + two]
    assert "wrote" in two[0].stdout and two[1].stdout == ""
    plans = [json.loads((tmp_path / n / "layerwise.json").read_text())["plan"]["layers"] for n in ("one", "two")]
    assert plans[0] == plans[1]
    a, b = dequantized(tmp_path / "one"), dequantized(tmp_path / "two")
    for name in a:
        assert torch.linalg.norm(a[name] - b[name]) <= 1e-3 * torch.linalg.norm(a[name]), name


def test_compress_inside_a_group_the_caller_started(tiny_model_dir, tmp_path):
    results = launch([[tiny_model_dir, tmp_path / "out"]] * 2, script=textwrap.dedent(API_RUNNER))
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert results[0].stdout == results[1].stdout != ""  # every rank holds the same result
    assert (tmp_path / "out" / "layerwise.json").is_file()


def test_two_ranks_measure_the_perplexity_of_one(tiny_model_dir, tmp_path):
    argv = ["eval", tiny_model_dir, "--max-tokens", "512", "--window", "64", "--json"]
    one = launch([[*argv, tmp_path / "one.json"]])
    two = launch([[*argv, tmp_path / "two.json"]] * 2)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr[-2000:] for r in one + two]
    ppl = [json.loads((tmp_path / f"{n}.json").read_text())["results"]["ppl"] for n in ("one", "two")]
    assert ppl[1]["tokens"] == ppl[0]["tokens"] == 8 * 63
    assert ppl[1]["perplexity"] == pytest.approx(ppl[0]["perplexity"], rel=1e-9)


def test_ranks_given_different_arguments_are_refused_before_any_work(tiny_model_dir, tmp_path):
    results = launch([["compress", tiny_model_dir, *COMPRESS, "--out", tmp_path / "out"],
                      ["compress", tiny_model_dir, *COMPRESS, "--bits", "4", "--out", tmp_path / "out"]])
    assert [r.returncode for r in results] == [2, 2]
    lines = errors(results)
    assert len(lines) == 1 and "ranks 1 were given other arguments than rank 0" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_fewer_windows_than_ranks_are_refused_once(tiny_model_dir, tmp_path):
    argv = ["compress", tiny_model_dir, "--bits", "3.25", "--calib", "pydoc", "--calib-windows", "1", "--calib-len",
            "32", "--out", tmp_path / "out"]
    results = launch([argv] * 2)
    lines = errors(results)
    assert [r.returncode for r in results] == [2, 2] and len(lines) == 1, lines
    assert "1 windows cannot be shared by 2 processes; give at least 2 (--calib-windows)" in lines[0]


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_a_failing_rank_ends_the_run_in_one_line(tiny_model_dir, tmp_path, action):
    """Rank 1 raises (or is killed) at layer 2: the group stops, one line says what happened, and nothing is
    left under --out."""
    results = launch([["compress", tiny_model_dir, *COMPRESS, "--out", tmp_path / "out"]] * 2,
                     fault=f"1:{action}")
    assert all(r.returncode != 0 for r in results)
    lines = errors(results)
    assert len(lines) == 1, [r.stderr[-2000:] for r in results]
    if action == "raise":
        assert lines[0] == "layerwise: error: rank 1: RuntimeError: injected failure"
    else:
        assert lines[0].startswith("layerwise: error: rank 0: another process of the group stopped without a message")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_streamed_ranks_resume_after_a_rank_is_killed(tiny_model_dir, tmp_path):
    """Streaming over 2 ranks: rank 0 alone writes the work directory, and no rank's layer inputs are saved.
    Rank 1 is killed while quantizing layer 2; the run ends in one line, leaving the finished layers. Resumed
    on 2 ranks, every rank makes its inputs again from the finished layers, and the checkpoint is the one of an
    uninterrupted streamed run on one process (same plan, weights equal to rounding)."""
    argv = ["compress", tiny_model_dir, "--scorer", "lim", "--bits", "3", "--method", "gptq", *CALIB, "--stream"]
    one = launch([[*argv, "--out", tmp_path / "one"]])
    assert one[0].returncode == 0, one[0].stderr[-2000:]
    killed = launch([[*argv, "--out", tmp_path / "two"]] * 2, env_by_rank={1: {KILL_ENV: "2"}})
    assert killed[1].returncode == -9 and killed[0].returncode != 0
    lines = errors(killed)
    assert len(lines) == 1 and "rank 0: another process of the group stopped without a message" in lines[0], lines
    work = partial_dir(tmp_path / "two")
    assert not (tmp_path / "two").exists() and (work / "layers" / "layer-00001.safetensors").is_file()
    assert not list(work.glob("hidden-*"))  # inputs are every rank's own: none saved
    resumed = launch([[*argv, "--resume", "--out", tmp_path / "two"]] * 2)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr[-2000:] for r in resumed]
    assert not work.exists()
    plans = [json.loads((tmp_path / n / "layerwise.json").read_text())["plan"]["layers"] for n in ("one", "two")]
    assert plans[0] == plans[1]
    a, b = dequantized(tmp_path / "one"), dequantized(tmp_path / "two")
    for name in a:
        assert torch.linalg.norm(a[name] - b[name]) <= 1e-3 * torch.linalg.norm(a[name]), name


def test_windows_are_dealt_round_robin(monkeypatch):
    """Rank r reads windows r, r + N, ...: the first k windows of the set are the first local_count(k) of each
    share, so a scorer reading a leading subset reads the same windows on N ranks as on one."""
    windows = torch.arange(10).unsqueeze(1)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(dist, "ranks", lambda rank=rank: dist.Ranks(rank, 3, rank, "gloo"))
        shares.append((dist.shard(windows), dist.local_count(7)))
    assert [s[:, 0].tolist() for s, _ in shares] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(int(v) for s, k in shares for v in s[:k, 0]) == list(range(7))
    with pytest.raises(layerwise.LayerwiseError, match="2 windows cannot be shared by 3 processes"):
        dist.shard(windows[:2])


def test_alone_every_helper_is_the_identity():
    assert dist.ranks() is None and dist.is_main() and dist.where() == ""
    t = torch.randn(3)
    assert dist.sum_in_order(t) is t and dist.sum_floats([1.5]) == [1.5] and dist.shard(t) is t
    dist.agree("anything", {"a": 1})  # nothing to compare against


RUNNER = textwrap.dedent(RUNNER)
