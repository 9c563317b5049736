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
from layerwise.importance.sensitivity import choose_split
from layerwise.model.adapter import decoder_layers, linear_modules

CALIB = ["--calib", "pydoc", "--calib-windows", "8", "--calib-len", "32"]
COMPRESS = ["--bits", "3.25", "--options", "2:32,3:32,4:32,8:32", "--method", "gptq", *CALIB]
LIM_RTN = ["--bits", "3.25", "--scorer", "lim", "--method", "rtn", "--group-size", "32", *CALIB]
# RTN after tying one layer to another and removing one (the tiny models have 4 layers).
TIED_RTN = ["--bits", "3.25", "--scorer", "lim", "--planner", "lwq", "--method", "rtn", "--group-size", "32",
            "--tie", "1", "--prune", "1", *CALIB]
# Runs layerwise's command line after an optional fault set up on one rank (see `launch`): RANK:ACTION[:WHERE], the
# rank raising (ACTION raise), refusing (refuse: a LayerwiseError) or killed (kill) at layer 2 while collecting
# GPTQ's Hessians; with ":rtn" at its third call to quantize modules with RTN (one module at a time: still in
# layer 0); with ":plan" when it plans for the ranks (its second plan: the first checks the budget).
RUNNER = """
import os, signal, sys
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
import layerwise.engine.applier as applier
import layerwise.engine.pipeline as pipeline
rank, fault = int(os.environ["RANK"]), os.environ.get("FAULT_RANK_ACTION", "")
if fault and rank == int(fault.split(":")[0]):
    action, where, calls = fault.split(":")[1], (fault.split(":") + [""])[2], []
    module, name, nth = {"rtn": (applier, "quantize_modules", 3), "plan": (pipeline, "_make_plan", 2)}.get(
        where, (applier, "collect_hessians", 0))
    original = getattr(module, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth if nth else args[0].index == 2:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise LayerwiseError("injected refusal") if action == "refuse" else RuntimeError("injected failure")
        return original(*args, **kwargs)

    setattr(module, name, failing)
code = main(sys.argv[1:])
import torch.distributed
assert code != 0 or not torch.distributed.is_initialized(), "a finished command left its process group"
sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `layerwise.compress` called in a process group the caller initialised, with GPTQ ("gptq") or with RTN after tying
# and pruning ("tied-rtn"); prints the plan and a hash of every tensor of the model it returned.
API_RUNNER = """
import hashlib, sys
import torch.distributed
import layerwise
torch.distributed.init_process_group("gloo")
flags = (dict(options="2:32,3:32,4:32,8:32", method="gptq") if sys.argv[3] == "gptq" else
         dict(scorer="lim", planner="lwq", method="rtn", group_size=32, tie=1, prune=1))
result = layerwise.compress(sys.argv[1], 3.25, calib="pydoc", calib_windows=8, calib_len=32, out=sys.argv[2],
                            progress=False, **flags)
digest = hashlib.sha256()
for name, tensor in result.model.state_dict().items():
    digest.update(name.encode() + tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(result.plan.avg_bits, [a.bits for a in result.plan.layers], [a.action for a in result.plan.layers],
      digest.hexdigest())
torch.distributed.destroy_process_group()
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


@pytest.mark.parametrize("flags", [COMPRESS, LIM_RTN, TIED_RTN], ids=["sensitivity-gptq", "lim-rtn", "tied-rtn"])
def test_two_ranks_write_the_checkpoint_of_one(tiny_model_dir, tmp_path, flags):
    """Calibration windows dealt over 2 gloo ranks of one thread, Hessians and Fisher vectors summed order-free,
    damages and LIM's cosines summed exactly over the ranks' windows, GPTQ's sweeps dealt; the plan and the RTN
    quantization done by rank 0 on both ranks' threads (the ranks share this machine's cores) and sent: the
    plan of one process on 2 threads, its weights byte for byte and every score and error in its report to the
    last bit, written once by rank 0, printed once."""
    one = launch([["compress", tiny_model_dir, *flags, "--out", tmp_path / "one"]],
                 env_by_rank={0: {"OMP_NUM_THREADS": "2"}})
    two = launch([["compress", tiny_model_dir, *flags, "--out", tmp_path / "two"]] * 2)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr[-2000:] for r in one + two]
    assert "wrote" in two[0].stdout and two[1].stdout == ""
    meta = [json.loads((tmp_path / n / "layerwise.json").read_text()) for n in ("one", "two")]
    assert meta[0]["plan"]["layers"] == meta[1]["plan"]["layers"]
    a, b = dequantized(tmp_path / "one"), dequantized(tmp_path / "two")
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    assert meta[0]["report"]["rows"] == meta[1]["report"]["rows"]  # every score and error


# Hessians of the same windows, on argv[1] ranks' shares or alone; prints H's bytes' hash and whether float64 sums
# taken in the ranks' grouping would have differed from one process's.
HESSIAN_RUNNER = """
import hashlib, sys, torch, torch.distributed
from layerwise.core import dist
from layerwise.quant.hessian import HessianAccumulator
if sys.argv[1] != "alone":
    torch.distributed.init_process_group("gloo")
g = torch.Generator().manual_seed(0)
width = 300  # more than one block of rows (BLOCK_ROWS)
windows = [torch.randn(64, width, generator=g) * 10.0 ** torch.randint(-3, 4, (width,), generator=g) for _ in range(9)]
acc = HessianAccumulator(width)
for w in dist.share(len(windows)):
    acc.add(windows[w])
acc.merge_ranks()
products = [w.double().T @ w.double() for w in windows]
zero = torch.zeros(width, width, dtype=torch.float64)
plain = dist.sum_in_order(sum((products[w] for w in dist.share(9)), zero))
alone = sum(products, zero)
print(hashlib.sha256(acc.hessian.numpy().tobytes()).hexdigest(), acc.n_tokens, torch.equal(plain, alone))
if sys.argv[1] != "alone":
    torch.distributed.destroy_process_group()
"""


def test_hessians_summed_over_ranks_have_the_bits_of_one_process():
    """Windows dealt over 2 and 3 ranks: H is the one a process adding every window makes, byte for byte, where
    float64 sums taken in the ranks' grouping come out different."""
    script = textwrap.dedent(HESSIAN_RUNNER)
    alone = launch([["alone"]], script=script)[0]
    assert alone.returncode == 0, alone.stderr[-2000:]
    digest, tokens, _ = alone.stdout.split()
    for world in (2, 3):
        results = launch([["ranks"]] * world, script=script)
        assert [r.returncode for r in results] == [0] * world, [r.stderr[-2000:] for r in results]
        printed = {tuple(r.stdout.split()) for r in results}
        assert printed == {(digest, tokens, "False")}, (world, printed)


@pytest.mark.parametrize("method", ["gptq", "tied-rtn"])
def test_compress_inside_a_group_the_caller_started(tiny_model_dir, tmp_path, method):
    """Every rank returns the same plan and the same quantized model, whether the ranks dealt the work (GPTQ) or
    rank 0 quantized every layer and sent them (RTN, the ranks sharing this machine's cores), ties included."""
    results = launch([[tiny_model_dir, tmp_path / "out", method]] * 2, script=textwrap.dedent(API_RUNNER))
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert results[0].stdout == results[1].stdout != ""  # every rank holds the same result
    if method == "tied-rtn":
        assert "'tie'" in results[0].stdout and "'prune'" in results[0].stdout
    assert (tmp_path / "out" / "layerwise.json").is_file()


def test_two_ranks_measure_the_perplexity_of_one(tiny_model_dir, tmp_path):
    argv = ["eval", tiny_model_dir, "--max-tokens", "512", "--window", "64", "--json"]
    one = launch([[*argv, tmp_path / "one.json"]])
    two = launch([[*argv, tmp_path / "two.json"]] * 2)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr[-2000:] for r in one + two]
    ppl = [json.loads((tmp_path / f"{n}.json").read_text())["results"]["ppl"] for n in ("one", "two")]
    assert ppl[1]["tokens"] == ppl[0]["tokens"] == 8 * 63
    assert ppl[1]["perplexity"] == ppl[0]["perplexity"]  # every window's NLL summed exactly over the ranks


# Evaluates the model on layerwise's offline lm-eval tasks (in a group when argv[2] says so) and prints the results
# with how many loglikelihood requests this rank ran.
EVAL_RUNNER = """
import json, sys, torch.distributed
from lm_eval.models.huggingface import HFLM
from layerwise.eval import evaluate
if sys.argv[2] == "group":
    torch.distributed.init_process_group("gloo")
counted = []
plain = HFLM.loglikelihood
def loglikelihood(self, requests, disable_tqdm=False):
    counted.append(len(requests))
    return plain(self, requests, disable_tqdm=disable_tqdm)
HFLM.loglikelihood = loglikelihood
result = evaluate(sys.argv[1], "wiki_mc,wiki_ppl", limit=6, progress=False)
results = {task: {k: v for k, v in entry.items() if k != "seconds"} for task, entry in result.results.items()}
print(json.dumps({"requests": sum(counted), "results": results}))
if sys.argv[2] == "group":
    torch.distributed.destroy_process_group()
"""


def test_two_ranks_split_the_lm_eval_documents_and_get_the_results_of_one(tiny_model_dir):
    """lm-eval deals each task's documents among the ranks and gathers their metrics: every rank returns the
    results of one process, having run about half of the requests."""
    script = textwrap.dedent(EVAL_RUNNER)
    one = launch([[tiny_model_dir, "alone"]], script=script)
    two = launch([[tiny_model_dir, "group"]] * 2, script=script)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr[-2000:] for r in one + two]
    alone, *ranks = (json.loads(r.stdout.strip().splitlines()[-1]) for r in one + two)
    assert ranks[0]["results"] == ranks[1]["results"]
    assert alone["requests"] > 0 and all(r["requests"] < alone["requests"] for r in ranks)
    assert sum(r["requests"] for r in ranks) >= alone["requests"]  # lm-eval pads the shorter share
    for task in ("wiki_mc", "wiki_ppl"):
        assert ranks[0]["results"][task]["samples"] == alone["results"][task]["samples"] == 6
        for metric, value in alone["results"][task].items():
            if "stderr" not in metric and isinstance(value, float):
                assert ranks[0]["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


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


@pytest.mark.parametrize(("fault", "flags", "line"), [
    ("1:raise", COMPRESS, "rank 1: RuntimeError: injected failure"),
    ("1:kill", COMPRESS, "rank 0: another process of the group stopped without a message"),
    ("0:raise:rtn", LIM_RTN, "rank 0: RuntimeError: injected failure"),
    ("0:kill:rtn", LIM_RTN, "rank 1: another process of the group stopped without a message"),
], ids=["rank-1-raises", "rank-1-killed", "rank-0-raises-for-both", "rank-0-killed-for-both"])
def test_a_failing_rank_ends_the_run_in_one_line(tiny_model_dir, tmp_path, fault, flags, line):
    """A rank raises (or is killed) while the ranks quantize with GPTQ, rank 1 at layer 2; or rank 0 at its third
    module while it quantizes with RTN for both ranks (they share this machine's cores) and rank 1 waits: the group
    stops, one line says what happened, and nothing is left under --out."""
    results = launch([["compress", tiny_model_dir, *flags, "--out", tmp_path / "out"]] * 2, fault=fault)
    assert all(r.returncode != 0 for r in results)
    lines = errors(results)
    assert len(lines) == 1, [r.stderr[-2000:] for r in results]
    assert lines[0].startswith(f"layerwise: error: {line}"), lines
    if "raise" in fault:
        assert lines[0] == f"layerwise: error: {line}"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_refusal_in_work_rank_0_does_for_the_group_is_said_once_as_a_refusal(tiny_model_dir, tmp_path):
    """Rank 0 refuses the input while it plans for both ranks: one line, and every rank exits as after bad
    input (2), not as after a failure."""
    results = launch([["compress", tiny_model_dir, *LIM_RTN, "--out", tmp_path / "out"]] * 2, fault="0:refuse:plan")
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-2000:] for r in results]
    assert errors(results) == ["layerwise: error: rank 0: injected refusal"]
    assert not (tmp_path / "out").exists()


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


# Each rank quantizes the same jobs with GPTQ's sweeps dealt among the ranks, then alone, and prints whether every
# stored tensor agrees, how many units it quantized itself, the warnings it was shown and the threads its RTN
# jobs ran on. argv[1]: "pooled" lets the ranks pool their threads (they share this machine's cores), "dealt"
# makes them deal every unit as ranks on separate machines would.
DEALT_RUNNER = """
import sys, warnings
import torch, torch.distributed
from torch import nn
from layerwise.core import dist
from layerwise.core.types import QuantSpec
import layerwise.quant.apply as apply
torch.distributed.init_process_group("gloo")
if sys.argv[1] == "dealt":
    dist.pools_threads = lambda device: False
torch.manual_seed(0)
def hessian(width):
    x = torch.randn(256, width)
    return 2 * x.T @ x / 256
shared, alone = hessian(32), hessian(48)
q, k, o = nn.Linear(32, 24), nn.Linear(32, 8), nn.Linear(48, 32, bias=False)
jobs = [(q, QuantSpec(4, 16, "gptq"), shared), (k, QuantSpec(4, 16, "gptq"), shared),
        (o, QuantSpec(3, 16, "gptq"), alone), (o, QuantSpec(2, 16, "gptq"), alone),
        (q, QuantSpec(4, 16, "rtn"), None), (k, QuantSpec(4, 16, "gptq"), shared)]
done, rtn_threads = [], []
plain = apply._quantize_unit
def counted(jobs, unit, results):
    done.append(unit)
    if jobs[unit[0]][1].method == "gptq":
        warnings.warn(f"sweep of {len(unit)} on rank {torch.distributed.get_rank()}")
    else:
        rtn_threads.append(torch.get_num_threads())
    plain(jobs, unit, results)
apply._quantize_unit = counted
with warnings.catch_warnings(record=True) as shown:
    warnings.simplefilter("always")
    dealt = apply.quantize_modules(jobs, across_ranks=True)
mine = len(done)
local = apply.quantize_modules(jobs)
same = all(torch.equal(a, b) for x, y in zip(dealt, local)
           for a, b in zip(x.state_dict().values(), y.state_dict().values()))
print(same, dealt[5] is dealt[1], mine, rtn_threads, "|", sorted(str(w.message) for w in shown))
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize(("mode", "units", "rtn_threads"), [("dealt", [1, 2], [[1], [1, 1]]),
                                                             ("pooled", [2, 1], [[2, 1], [1]])])
def test_quantizations_are_dealt_among_ranks_and_sent_back(mode, units, rtn_threads):
    """The GPTQ sweeps (q/k together, o at 3 and at 2 bits together) are done by one rank each, dealt by cost
    (o's sweep to rank 0, q/k's to rank 1). The RTN job is dealt too (to rank 1, the least loaded) on ranks
    that do not share cores; ranks that share them leave it to rank 0, which runs it on both ranks' threads.
    Every rank ends with the results of one process, byte for byte; warnings from either rank's sweeps are
    raised on every rank."""
    results = launch([[mode]] * 2, script=textwrap.dedent(DEALT_RUNNER))
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    printed = [r.stdout.strip().split(" | ") for r in results]
    assert {p[1] for p in printed} == {"['sweep of 2 on rank 0', 'sweep of 2 on rank 1']"}, printed
    assert all(p[0].startswith("True True ") for p in printed), printed
    assert [int(p[0].split(" ", 3)[2]) for p in printed] == units, printed  # units quantized by ranks 0 and 1
    # The RTN job's threads where it was quantized with the ranks, then alone (one thread each).
    assert [json.loads(p[0].split(" ", 3)[3]) for p in printed] == rtn_threads, printed


# Scores the model with the sensitivity scorer (GPTQ options, per module) split as argv[2] says ("alone": no group)
# and prints the measured damages.
SPLIT_RUNNER = """
import json, sys, torch, torch.distributed
from transformers import AutoModelForCausalLM
from layerwise.importance.base import score_model
if sys.argv[2] != "alone":
    torch.distributed.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
windows = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
options = {"options": "2:32,4:32", "method": "gptq", "damage_windows": 4, "granularity": "fused",
           "split": "auto" if sys.argv[2] == "alone" else sys.argv[2]}
scores = score_model(model, ["sensitivity"], windows, calibration={"corpus": "random"},
                     scorer_options={"sensitivity": options}, progress=False)["sensitivity"]
print(json.dumps({"damage": scores.module_damage, "calibration": scores.calibration}))
if sys.argv[2] != "alone":
    torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("split", ["windows", "options"])
def test_sensitivity_split_by_windows_or_by_options_measures_the_damages_of_one_process(tiny_model_dir, split):
    """Sharing the windows (Fisher vectors as compensated sums, damages summed exactly over the ranks' windows)
    or the option runs (each run measured by one rank), 2 ranks measure every damage that one process does, to
    the last bit."""
    script = textwrap.dedent(SPLIT_RUNNER)
    one = launch([[tiny_model_dir, "alone"]], script=script)
    two = launch([[tiny_model_dir, split]] * 2, script=script)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr[-2000:] for r in one + two]
    alone, *ranks = (json.loads(r.stdout) for r in one + two)
    assert ranks[0] == ranks[1]  # every rank holds every damage
    # What was read, as one process reads it: the 4 damage windows of the 6, not every rank's share of all 6.
    assert ranks[0]["calibration"] == alone["calibration"] == {"corpus": "random", "windows": 4, "tokens": 128}
    alone, ranks = alone["damage"], [r["damage"] for r in ranks]
    flat = [(d, u, o) for d, layer in enumerate(alone) for u, by_option in layer.items() for o in by_option]
    assert len(flat) == 4 * 4 * 2  # 4 layers; q/k/v, o, gate/up and down; both options
    assert [(d, u, o) for d, u, o in flat if ranks[0][d][u][o] != alone[d][u][o]] == []


# Scores the model with every scorer that reads activations, in one pass, alone or on the ranks' shares of the
# windows, and prints everything they measured (ppl_drop's losses too) as JSON text, then whether the pass was
# sharded.
SHARED_SCORERS_RUNNER = """
import json, sys, torch, torch.distributed
from transformers import AutoModelForCausalLM
from layerwise.importance.base import score_model
from layerwise.importance.ppl_drop import PplDropScorer
if sys.argv[2] != "alone":
    torch.distributed.init_process_group("gloo")
made = []
init = PplDropScorer.__init__
PplDropScorer.__init__ = lambda self, **kw: (made.append(self), init(self, **kw))[1]
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
windows = torch.randint(0, model.config.vocab_size, (7, 32), generator=torch.Generator().manual_seed(0))
names = ["lim", "angular", "sublayer", "tie", "ppl_drop"]
options = {"angular": {"stride": 4}, "tie": {"windows": 5}, "ppl_drop": {"windows": 5, "max_remove": 2}}
scores = score_model(model, names, windows, calibration={"corpus": "random"}, scorer_options=options,
                     progress=False)
measured = {name: {**scores[name].to_dict(), "seconds": None} for name in names}
ppl = made[0]
measured["ppl_drop_losses"] = [ppl.base_nll, ppl.first_round_nll, ppl.step_nll, ppl.order]
print(json.dumps(measured, sort_keys=True))
print("sharded" if ppl.sharded else "whole")
if sys.argv[2] != "alone":
    torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_activation_scorers_on_shared_windows_measure_the_bits_of_one_process(tiny_model_dir, n_ranks):
    """LIM, angular distance, sub-layer cosines, tie damage and ppl_drop's losses read each rank's share of the
    windows (shares of 3, 2 and 2 windows on 3 ranks) and sum per-window numbers exactly: every value, to the
    last bit, is what one process measures on all the windows."""
    script = textwrap.dedent(SHARED_SCORERS_RUNNER)
    one = launch([[tiny_model_dir, "alone"]], script=script)
    ranks = launch([[tiny_model_dir, "group"]] * n_ranks, script=script)
    assert [r.returncode for r in one + ranks] == [0] * (1 + n_ranks), [r.stderr[-2000:] for r in one + ranks]
    assert one[0].stdout.endswith("whole\n") and all(r.stdout.endswith("sharded\n") for r in ranks)
    assert {r.stdout.splitlines()[0] for r in ranks} == {one[0].stdout.splitlines()[0]}
    measured = json.loads(one[0].stdout.splitlines()[0])
    assert measured["lim"]["calibration"] == {"corpus": "random", "windows": 7, "tokens": 224}
    assert len(measured["angular"]["block_distance"]["1"]) == 4 and len(measured["ppl_drop_losses"][2]) == 2


def test_the_cheaper_split_is_chosen():
    assert choose_split(24, 6, 2) == "windows"  # 12 x 7 = 84 layer runs of a window per rank, against 24 x 4 = 96
    assert choose_split(2, 36, 8) == "options"  # fewer windows than ranks
    assert choose_split(3, 40, 2) == "options"  # 2 x 41 = 82 (one rank gets 2 of the 3 windows) against 3 x 21 = 63
    assert choose_split(8, 40, 8) == "windows"  # 1 x 41 against 8 x 6 = 48


def test_jobs_are_dealt_costliest_first_to_the_least_loaded_rank(monkeypatch):
    monkeypatch.setattr(dist, "ranks", lambda: dist.Ranks(0, 2, 0, "gloo"))
    costs = [3.0, 5.0, 3.0, 4.0, 3.0]
    owners = dist.deal(costs)
    assert owners == [1, 0, 0, 1, 1]  # 5 -> 0, 4 -> 1, then the 3s in order: to 1 (7), 0 (8), 1 (10)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in (0, 1)]
    assert abs(loads[0] - loads[1]) <= max(costs)


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_weights_digest_tells_other_weights_apart(arch):
    """Ranks compare a hash of a few thousand values per tensor: equal for the same weights, different in the one
    tensor that changed, as a fine-tune changes a matrix (everywhere)."""
    from conftest import tiny_model

    from layerwise.engine.pipeline import weights_digest

    model = tiny_model(arch)
    assert weights_digest(model) == weights_digest(tiny_model(arch))
    with torch.no_grad():
        linear_modules(decoder_layers(model)[1]).popitem()[1].weight.mul_(1.001)
    changed = [a for a, b in zip(weights_digest(model), weights_digest(tiny_model(arch)), strict=True) if a != b]
    assert len(changed) == 1 and ".1." in changed[0][0], changed
    assert weights_digest(tiny_model(arch, seed=1)) != weights_digest(model)


# Checks a tiny llama with NaN and Inf in four tensors for non-finite weights, alone and then in the group,
# and prints what the group's check said and which tensors this rank read.
FINITE_RUNNER = """
import json, torch, torch.distributed
from layerwise.core.errors import LayerwiseError
from layerwise.model import adapter
from layerwise.model.adapter import check_finite_weights
from tests.conftest import tiny_model
model = tiny_model("llama", n_layers=4)
bad = ["self_attn.q_proj", "mlp.down_proj", "self_attn.v_proj", "mlp.up_proj"]
with torch.no_grad():
    for i, name in enumerate(bad):
        model.get_parameter(f"model.layers.{i}.{name}.weight")[1, : i + 1] = float("nan") if i % 2 else float("inf")
def said(model):
    try:
        check_finite_weights(model, "tiny")
    except LayerwiseError as exc:
        return str(exc)
alone = said(model)
torch.distributed.init_process_group("gloo")
read = []
plain = adapter.nonfinite_tensors
def recorded(tensors):
    tensors = list(tensors)
    read.extend(name for name, _ in tensors)
    return plain(tensors)
adapter.nonfinite_tensors = recorded
print(json.dumps({"alone": alone, "group": said(model), "read": read,
                  "all": [name for name, _ in model.named_parameters()]}))
torch.distributed.destroy_process_group()
"""


def test_ranks_check_the_weights_for_nan_in_shares_and_refuse_as_one_process():
    """Each rank reads its share of the tensors for NaN and Inf (together every tensor, once), and every rank
    refuses the model with the message of one process, naming the four bad tensors in order."""
    results = launch([[]] * 2, script=FINITE_RUNNER)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    printed = [json.loads(r.stdout) for r in results]
    assert all(p["group"] == p["alone"] for p in printed) and printed[0]["alone"].count("weight (") == 4, printed
    reads = [p["read"] for p in printed]
    assert all(reads) and sorted(reads[0] + reads[1]) == sorted(printed[0]["all"]), reads


def test_alone_every_helper_is_the_identity():
    assert dist.ranks() is None and dist.is_main() and dist.where() == ""
    t = torch.randn(3)
    assert dist.sum_in_order(t) is t and dist.sum_floats([1.5]) == [1.5] and dist.shard(t) is t
    assert dist.deal([2.0, 1.0]) == [0, 0]
    assert dist.from_owners([0, 0], lambda i: [t + i], lambda i: [torch.zeros(3)])[1][0].equal(t + 1)
    assert dist.on_main(lambda: "done here") == "done here" and dist.local_ranks() == 1
    assert not dist.pools_threads(torch.device("cpu"))
    threads = torch.get_num_threads()
    with dist.pooled_threads():
        assert torch.get_num_threads() == threads
    dist.agree("anything", {"a": 1})  # nothing to compare against


RUNNER = textwrap.dedent(RUNNER)
