"""`evaluate()`: layerwise's perplexity protocol plus lm-eval tasks, on the model in memory.

Tasks by name:

* ``ppl``: perplexity by layerwise's own protocol (`layerwise.eval.perplexity`, default
  ``wiki-16k-w1024``); needs nothing beyond layerwise.
* ``wiki_mc``, ``wiki_ppl``: layerwise's offline lm-eval tasks, built from the evaluation half of the
  built-in Wikipedia corpus (`layerwise.eval.wiki_tasks`); never touch a hub.
* anything else: an lm-eval task, group or tag (``hellaswag``, ``arc_easy``, ``mmlu``, ...), or a task
  from the user's own ``include_path``. lm-eval reads their data sets from the Hugging Face hub or its
  local cache.

lm-eval (``pip install 'layerwise[eval]'``) is imported only when a task other than ``ppl`` is asked
for. The model is wrapped in lm-eval's ``HFLM`` as it is (compressed modules included), never reloaded;
`HFLM.get_model_info` is replaced so that no hub lookup happens. Every lm-eval task runs through its own
``simple_evaluate`` call, so each gets its wall time; all their data sets are loaded once up front, so
a missing data set fails before any scoring starts.

In a process group (`layerwise.core.dist`, e.g. under torchrun) lm-eval deals each task's documents among the
ranks and gathers their metrics on rank 0, which sends the results to every rank.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.validate import check_numbers
from layerwise.eval.perplexity import DEFAULT_PROTOCOL, PerplexityProtocol, perplexity
from layerwise.eval.results import PPL_TASK, EvalResult
from layerwise.eval.wiki_tasks import OFFLINE_TASKS
from layerwise.model.placement import Placement, placement_for, sequential_onload

LM_EVAL_INSTALL = "pip install 'layerwise[eval]'"
# Loglikelihood requests per forward. 24 wiki_mc items on the default model, 2 CPU cores shared with other
# jobs: 520 s at lm-eval's default of 1, 122 s at 8, 55 s at 32 (2 threads; 33 s and 28 s at 8 and 32 with
# 1 thread). The requests are short, so a batch of 32 holds about 1 GB of log-probabilities here.
DEFAULT_BATCH_SIZE = 32
# lm-eval's own default is 100,000 bootstrap resamples for the stderr of non-mean metrics (perplexities),
# which takes minutes; 1,000 gives the same stderr to two digits.
BOOTSTRAP_ITERS = 1000
_HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from ``"ppl,wiki_mc"`` or a list, in order, without duplicates."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(t).strip() for t in items]
    if not names or any(not n for n in names):
        raise LayerwiseError(f"empty task name in {tasks!r}; give names separated by commas, e.g. ppl,wiki_mc")
    return list(dict.fromkeys(names))


def evaluate(
    model: nn.Module | str | None = None,
    tasks: str | Sequence[str] = (PPL_TASK,),
    *,
    tokenizer: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> EvalResult:
    """Evaluate `model` on `tasks` and return an `EvalResult` (``.to_dict()`` is the schema-1 JSON).

    `model`: an ``AutoModelForCausalLM`` in memory (compressed or not; pass its `tokenizer`), a layerwise
    checkpoint directory, a plain HF directory, a hub id, or None for the default model.
    `tasks`: ``"ppl,wiki_mc"`` or a list (see the module docstring).
    `batch_size`: lm-eval loglikelihood requests per forward (multiple choice); rolling perplexities
    (``wiki_ppl``) and ``ppl`` score one window at a time.
    `limit` caps the documents per lm-eval task (an int, or a fraction below 1); for quick checks only.
    `include_path`: directories of the user's own lm-eval task YAMLs.
    `device` (auto, cpu, cuda, cuda:N) and `dtype` (float32, bfloat16, float16; default: the model's own on a
    GPU, float32 on the CPU): where the forwards run, one decoder layer on the device at a time when the
    model does not fit there (`layerwise.model.placement.sequential_onload`); the weights stay where they are.
    """
    placement = _placement(device, dtype, model)
    evaluator = Evaluator(tasks, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot, protocol=protocol,
                          include_path=include_path)
    return evaluator(model, tokenizer=tokenizer, model_name=model_name, progress=progress, placement=placement)


def _placement(device: str | torch.device | None, dtype: str | torch.dtype | None, model: Any) -> Placement | None:
    """The placement of the evaluation's forwards (None: the CPU in float32, where the model is); under
    torchrun, this rank's device, once the process group is joined (`layerwise.core.dist`)."""
    from layerwise.model.device import checkpoint_dtype, resolve_device, resolve_dtype

    resolved = dist.local_device(resolve_device(device))
    dist.init_from_environment(resolved)
    own = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else None
    if own is None and isinstance(model, str | os.PathLike) and Path(model).is_dir():
        own = checkpoint_dtype(model)
    return placement_for(resolved, resolve_dtype(dtype, resolved, own))


class Evaluator:
    """Tasks checked and their data loaded once, then any number of models evaluated on them.

    Everything that can be wrong with the request (task names, lm-eval missing, task data, paths) fails
    here, before a model is loaded or anything is scored.
    """

    def __init__(
        self,
        tasks: str | Sequence[str] = (PPL_TASK,),
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> None:
        self.tasks = parse_tasks(tasks)
        if batch_size < 1:
            raise LayerwiseError(f"batch size must be at least 1, got {batch_size}")
        if limit is not None and limit <= 0:
            raise LayerwiseError(f"limit must be positive, got {limit}")
        if num_fewshot is not None and num_fewshot < 0:
            raise LayerwiseError(f"num_fewshot must be 0 or more, got {num_fewshot}")
        check_numbers(batch_size=batch_size, limit=limit, num_fewshot=num_fewshot)  # NaN, inf, non-integers
        self.batch_size, self.limit, self.num_fewshot, self.protocol = batch_size, limit, num_fewshot, protocol
        harness_tasks = [n for n in self.tasks if n != PPL_TASK]
        self.session = _HarnessSession(harness_tasks, include_path) if harness_tasks else None
        if self.session is not None:
            self.session.load_data()

    def __call__(self, model: nn.Module | str | None = None, *, tokenizer: Any = None,
                 model_name: str | None = None, progress: bool = True,
                 placement: Placement | None = None) -> EvalResult:
        model, tokenizer, name, model_info = resolve_model(model, tokenizer, model_name)
        results: dict[str, dict[str, Any]] = {}
        task_versions: dict[str, Any] = {}
        try:
            for task in self.tasks:
                if task == PPL_TASK:
                    results[PPL_TASK] = perplexity(model, tokenizer, self.protocol, progress=progress,
                                                   placement=placement).to_dict()
                    continue
                assert self.session is not None
                entries, versions = self.session.run(task, model, tokenizer, batch_size=self.batch_size,
                                                     limit=self.limit, num_fewshot=self.num_fewshot,
                                                     progress=progress, placement=placement)
                results.update(entries)
                task_versions.update(versions)
        finally:
            if self.session is not None:
                self.session.release()  # the next call wraps its own model
        config = {
            "tasks": self.tasks,
            "batch_size": self.batch_size,
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "protocol": asdict(self.protocol) if PPL_TASK in self.tasks else None,
            "include_path": None if self.session is None else [str(p) for p in self.session.user_paths],
            "model_info": model_info,
        }
        return EvalResult(model=name, results=results, config=config,
                          versions=_versions(self.session, task_versions))


# -------------------------------------------------------------------------------------------- the model


def resolve_model(model: nn.Module | str | None, tokenizer: Any = None,
                  model_name: str | None = None) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    """(model, tokenizer, name for reports, facts about the model) for a module, checkpoint or model name."""
    from layerwise.model.loading import model_name as display_name

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise LayerwiseError("evaluating a model object needs its tokenizer; pass tokenizer=")
        name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        return model, tokenizer, name, _model_facts(model, {"kind": "in-memory"})
    loaded, loaded_tokenizer, info = load_for_eval(model)
    return loaded, tokenizer or loaded_tokenizer, model_name or display_name(model), _model_facts(loaded, info)


def load_for_eval(path: str | os.PathLike | None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A layerwise checkpoint if the directory has layerwise.json, else a plain model (dir, hub id, alias).

    Also returns what reports need: ``kind`` (``checkpoint`` or ``model``), the local ``path`` and, for a
    checkpoint, its ``avg_bits``.
    """
    from layerwise.model.loading import load_model, resolve_model_path
    from layerwise.output.checkpoint import is_checkpoint, load_checkpoint

    if path is not None and is_checkpoint(path):
        ckpt = load_checkpoint(path)
        if ckpt.tokenizer is None:
            raise LayerwiseError(f"checkpoint {path} has no tokenizer files; it cannot be evaluated on text")
        avg_bits = ckpt.meta.get("report", {}).get("avg_bits", ckpt.plan.avg_bits)
        return ckpt.model, ckpt.tokenizer, {"kind": "checkpoint", "path": str(Path(path).resolve()),
                                            "avg_bits": avg_bits}
    if path is not None and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise LayerwiseError(
            f"directory {path} is not a Hugging Face model (no config.json) nor a layerwise checkpoint (no "
            "layerwise.json); pass a directory written by save_pretrained or `layerwise compress`, or omit it "
            "for the default model"
        )
    model, tokenizer = load_model(None if path is None else str(path))
    local = resolve_model_path(None if path is None else str(path))
    return model, tokenizer, {"kind": "model", "path": str(Path(local).resolve())}


def _model_facts(model: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    first = next(model.parameters(), None)
    return {**info, "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": None if first is None else str(first.dtype).removeprefix("torch.")}


def _versions(session: _HarnessSession | None, task_versions: dict[str, Any]) -> dict[str, Any]:
    import transformers

    import layerwise

    versions: dict[str, Any] = {"layerwise": layerwise.__version__, "torch": torch.__version__,
                                "transformers": transformers.__version__}
    if session is not None:
        versions["lm_eval"] = session.lm_eval_version
        versions["tasks"] = task_versions
    return versions


# ---------------------------------------------------------------------------------------------- lm-eval


def require_lm_eval(tasks: Sequence[str]):
    """lm-eval's top-level module, or a one-line error saying how to install it."""
    try:
        import lm_eval
        from lm_eval import evaluator  # noqa: F401  (fails on a broken install)
    except ImportError as exc:
        raise LayerwiseError(
            f"task(s) {', '.join(tasks)} run through lm-eval, which is not installed ({exc}); run "
            f"`{LM_EVAL_INSTALL}`, or use --tasks ppl"
        ) from None
    return lm_eval


class _HarnessSession:
    """The lm-eval side of an `Evaluator`: the task manager, the task data, and the wrapped model of the call
    in progress."""

    def __init__(self, tasks: list[str], include_path: Any) -> None:
        self.tasks = tasks
        lm_eval = require_lm_eval(tasks)
        self.lm_eval_version = getattr(lm_eval, "__version__", None) or _dist_version("lm_eval")
        self.user_paths = _user_paths(include_path)
        paths: list[Path] = []
        if any(t in OFFLINE_TASKS for t in tasks):
            from layerwise.eval.wiki_tasks import prepare_task_dir

            paths.append(prepare_task_dir())
        paths += self.user_paths
        with _quiet_lm_eval():
            manager = _task_manager(tuple(str(p) for p in paths), include_defaults=False)
            if any(t not in manager.all_tasks for t in tasks):  # lm-eval's own tasks: index them too (~10 s)
                manager = _task_manager(tuple(str(p) for p in paths), include_defaults=True)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            known = [*manager.all_tasks, *OFFLINE_TASKS, PPL_TASK]
            close = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3, cutoff=0.75)})
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise LayerwiseError(
                f"unknown task(s) {', '.join(repr(t) for t in unknown)}: not {PPL_TASK}, not one of layerwise's "
                f"offline tasks ({', '.join(OFFLINE_TASKS)}), and not among lm-eval's "
                f"{len(manager.all_tasks)} tasks, groups and tags{hint} (list them with `lm-eval ls tasks`)"
            )
        self.manager = manager
        self.offline = _offline_wanted(tasks)
        self._lm = None

    def load_data(self) -> None:
        """Build every task once so that a missing or malformed data set fails before any scoring."""
        for task in self.tasks:
            with self._context():
                try:
                    self.manager.load([task])
                except Exception as exc:  # datasets, the hub client and lm-eval raise many unrelated types
                    raise self._data_error(task, exc) from None

    def run(self, task: str, model: nn.Module, tokenizer: Any, *, batch_size: int, limit: int | float | None,
            num_fewshot: int | None, progress: bool,
            placement: Placement | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Results of one task (several entries for a group) and the task versions lm-eval reports.

        With a `placement` lm-eval puts its inputs on the placement's device and every forward runs under
        `sequential_onload` (the model's weights stay where they are).
        """
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        with self._context(), _progress_bars(progress), sequential_onload(model, placement, what=f"task {task}"):
            if self._lm is None:
                self._lm = _wrap(model, tokenizer, batch_size, None if placement is None else placement.device)
            try:
                out = simple_evaluate(model=self._lm, tasks=[task], task_manager=self.manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
            except LayerwiseError:
                raise
            except Exception as exc:
                if _is_data_error(exc):
                    raise self._data_error(task, exc) from None
                raise
            out = dist.from_main(out)  # lm-eval gathers the metrics on rank 0 alone
        entries = convert_lm_eval_results(out)
        if task in entries:
            entries[task]["seconds"] = round(time.perf_counter() - start, 2)
        return entries, dict(out.get("versions", {}))

    def release(self) -> None:
        """Forget the wrapped model, so the next call wraps its own."""
        self._lm = None

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with _quiet_lm_eval(), _hub_offline(self.offline), _no_environment_probe():
            yield

    def _data_error(self, task: str, exc: BaseException) -> LayerwiseError:
        cause = _first_line(exc)
        if task in OFFLINE_TASKS:
            return LayerwiseError(f"task {task}: its data could not be loaded ({cause})")
        sources = _data_sources(self.manager, task)
        entry = self.manager.task_index.get(task)
        yaml_path = getattr(entry, "yaml_path", None)
        local = [s for s in sources if s.startswith("local files")]
        if local or (yaml_path and any(Path(yaml_path).is_relative_to(p) for p in self.user_paths)):
            return LayerwiseError(
                f"task {task} could not load its data ({cause}); check the data files its definition "
                f"{yaml_path} names"
            )
        needs = ", ".join(sources) or "a data set"
        mode = "offline (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set, or the hub is unreachable)" if self.offline \
            else "online"
        return LayerwiseError(
            f"task {task} needs the Hugging Face data set {needs}, which could not be loaded {mode}: {cause}. "
            "Make it available: run the same command once where huggingface.co is reachable (or copy "
            "~/.cache/huggingface/datasets from such a machine), then set HF_DATASETS_OFFLINE=1 to use the "
            "cached copy; layerwise's offline tasks need no download: " + ", ".join(OFFLINE_TASKS)
        )


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], include_defaults: bool):
    """lm-eval's index of task YAMLs; indexing its own 14,000 takes about 10 s, so it is kept per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def _wrap(model: nn.Module, tokenizer: Any, batch_size: int, device: torch.device | None = None):
    """lm-eval's HFLM around the model object, with no hub lookups; `device` (default: the model's) is
    where lm-eval puts its inputs."""
    from lm_eval.models.huggingface import HFLM

    class LayerwiseLM(HFLM):
        def get_model_info(self) -> dict:  # the stock one asks the hub for the model's commit
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(self._model.dtype)}

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # One rolling window (up to the model's full length) per forward, as `ppl` does: a batch of
            # them holds batch x length x vocabulary log-probabilities twice (7 GB for 8 x 2,300 tokens here).
            saved, self.batch_size_per_gpu = self.batch_size_per_gpu, 1
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.batch_size_per_gpu = saved

        # Data parallel over a process group (`layerwise.core.dist`): lm-eval deals each task's documents among
        # the ranks by `rank` and `world_size` and gathers their metrics on rank 0 through these.
        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            return dist.gather_along_first(tensor)

        def barrier(self) -> None:
            dist.barrier()

    # HFLM sets a pad token on the tokenizer it is given; keep the caller's tokenizer as it was.
    lm = LayerwiseLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    if device is not None:
        lm._device = device  # HFLM reads a model object's device once, at construction
    group = dist.ranks()
    if group is not None:  # HFLM takes a model object for a single process
        lm._rank, lm._world_size = group.rank, group.world
    return lm


def convert_lm_eval_results(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` as schema-1 entries: ``"acc,none"`` -> ``"acc"``, "N/A" -> None, + samples."""
    samples = out.get("n-samples", {})
    converted: dict[str, dict[str, Any]] = {}
    for task, metrics in out.get("results", {}).items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len", "sample_count"):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else key
            entry[name] = None if value == "N/A" else value
        if isinstance(samples.get(task), dict) and "effective" in samples[task]:
            entry["samples"] = samples[task]["effective"]
        converted[task] = entry
    return converted


def _user_paths(include_path: Any) -> list[Path]:
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [Path(p).expanduser() for p in items]
    for p in paths:
        if not p.exists():
            raise LayerwiseError(f"task directory {p} does not exist; pass a directory of lm-eval task YAMLs")
    return paths


def _data_sources(manager, task: str, depth: int = 0) -> list[str]:
    """``path/name`` of the data sets a task (or each task of a group or tag) loads, from lm-eval's index."""
    entry = manager.task_index.get(task)
    if entry is None or depth > 3:
        return []
    cfg = getattr(entry, "cfg", None) or {}
    if cfg.get("dataset_path"):
        path = str(cfg["dataset_path"])
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if path in ("json", "csv", "text", "parquet", "arrow") and files:
            return [f"local files {files}"]
        return [path + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")]
    children = cfg.get("task") or []
    if isinstance(children, str):
        children = [children]
    found: list[str] = []
    for child in children:
        name = child if isinstance(child, str) else (child.get("task") if isinstance(child, dict) else None)
        if isinstance(name, str):
            found += [s for s in _data_sources(manager, name, depth + 1) if s not in found]
        if len(found) >= 3:
            return found[:3] + ["..."]
    return found


def _is_data_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"DatasetNotFoundError", "DataFilesNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError",
                         "ConnectionError", "FileNotFoundError", "DatasetGenerationError", "EmptyDatasetError"})


def _offline_wanted(tasks: Sequence[str]) -> bool:
    """Offline for layerwise's own tasks, when the user says so, or when the hub cannot be reached."""
    if all(t in OFFLINE_TASKS for t in tasks):
        return True
    if any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        host = endpoint.hostname or "huggingface.co"
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Make datasets and the hub client use local files only, for the duration.

    Both read their offline flags at import, and transformers imported them long before, so the module
    flags are set as well as the environment; all are restored afterwards.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {v: os.environ.get(v) for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
             getattr(datasets.config, "HF_DATASETS_OFFLINE", None))
    os.environ.update({v: "1" for v in saved_env})
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[0], saved[1]
        datasets.config.HF_DATASETS_OFFLINE = saved[2]


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Without progress, lm-eval's bars (building requests, tokenizing, scoring) are switched off: tqdm
    reads its TQDM_DISABLE variable only at import, so the modules' `tqdm` name is swapped for the duration."""
    if enabled:
        yield
        return
    import importlib

    import tqdm

    bar = tqdm.tqdm

    def silent(*args: Any, **kwargs: Any):
        return bar(*args, **{**kwargs, "disable": True})

    modules = [importlib.import_module(m) for m in ("lm_eval.api.model", "lm_eval.api.task",
                                                    "lm_eval.models.huggingface")]
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")] + [(tqdm, tqdm.tqdm)]
    for module, _ in saved:
        module.tqdm = silent
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


@contextlib.contextmanager
def _no_environment_probe() -> Iterator[None]:
    """simple_evaluate records the git commit of the working directory (printing git's "fatal: not a git
    repository" elsewhere) and torch's environment report (a dozen subprocesses, seconds). layerwise's
    result records its own versions instead, so both are skipped for the duration."""
    import lm_eval.evaluator as evaluator

    saved = (evaluator.get_git_commit_hash, evaluator.add_env_info)
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO and warns that a model object ignores its loading options; datasets
    draws a bar per split it prepares. Neither says anything actionable here."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars = None
    try:
        import datasets.utils.logging as ds_logging

        bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
