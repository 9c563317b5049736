"""The result of `layerwise.eval.evaluate` and its JSON form (``layerwise eval --json``), schema version 1.

    {
      "format": "layerwise.eval",
      "schema_version": 1,
      "model": "smollm2-135m",                  # what was evaluated, as the user named it
      "results": {                              # task -> metric -> value
        "ppl": {"perplexity": 19.61, "nll": 2.976, "tokens": 16368, "windows": 16,
                "protocol": "wiki-16k-w1024", "protocol_description": "...", "seconds": 61.2},
        "wiki_mc": {"acc": 0.61, "acc_stderr": 0.03, "acc_norm": 0.58, "acc_norm_stderr": 0.03,
                    "samples": 250, "seconds": 95.0},
        ...
      },
      "config": {"tasks": [...], "batch_size": 8, "limit": null, "num_fewshot": null,
                 "protocol": {...}, "model_info": {...}},
      "versions": {"layerwise": "0.1.0", "torch": "...", "transformers": "...", "lm_eval": "0.4.13",
                   "tasks": {"wiki_mc": 1.0}}
    }

Rules that hold for every later release of schema version 1: the keys above keep their meaning; new
keys may be added (readers ignore what they do not know); a change that removes or redefines a key
raises ``schema_version``. lm-eval metrics keep lm-eval's names with its default ``,none`` filter
suffix dropped (``acc``, ``acc_stderr``, ``word_perplexity``); a metric under another filter keeps it
(``exact_match,strict-match``). A group task (e.g. ``mmlu``) also reports each of its subtasks under
its own name. ``samples`` is the number of documents scored, ``seconds`` the wall time of the task.

`EvalResult.from_dict` also reads the flat JSON that ``layerwise eval --json`` wrote before schema 1
(``{"model", "perplexity", "nll", "tokens", ...}``) as a result with one ``ppl`` task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import read_json, write_json_atomic

FORMAT = "layerwise.eval"
SCHEMA_VERSION = 1
PPL_TASK = "ppl"
# The metric that stands for a task in tables and plots, by output type; the first one present wins.
MAIN_METRICS = ("perplexity", "acc", "acc_norm", "word_perplexity", "exact_match", "f1", "mcc", "bleu")
LOWER_IS_BETTER = frozenset({"perplexity", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte"})
_LEGACY_PPL_KEYS = ("perplexity", "nll", "tokens", "windows", "protocol", "protocol_description", "seconds")


@dataclass
class EvalResult:
    """Scores of one model on one or more tasks; `results[task][metric]` is a number (or a protocol name)."""

    model: str
    results: dict[str, dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "results": self.results,
            "config": self.config,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "results") -> EvalResult:
        if "format" not in data and all(k in data for k in ("perplexity", "protocol")):  # before schema 1
            ppl = {k: data[k] for k in _LEGACY_PPL_KEYS if k in data}
            return cls(model=str(data.get("model", "")), results={PPL_TASK: ppl})
        if data.get("format") != FORMAT:
            raise LayerwiseError(f"{source} is not a layerwise eval result (format {data.get('format')!r}); "
                                 "pass a JSON written by `layerwise eval --json`")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise LayerwiseError(f"{source} has schema version {data.get('schema_version')!r}; this layerwise "
                                 f"reads {SCHEMA_VERSION} (upgrade layerwise or evaluate again)")
        results = data.get("results")
        if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
            raise LayerwiseError(f"{source} is malformed: 'results' must map each task to its metrics")
        return cls(model=str(data.get("model", "")), results=results, config=dict(data.get("config") or {}),
                   versions=dict(data.get("versions") or {}))

    def merged(self, other: EvalResult) -> EvalResult:
        """This result with `other`'s tasks added (`other` wins where both measured a task)."""
        mine, theirs = self.config.get("tasks", list(self.results)), other.config.get("tasks", list(other.results))
        tasks = list(dict.fromkeys([*mine, *theirs]))
        return EvalResult(model=self.model, results={**self.results, **other.results},
                          config={**self.config, **other.config, "tasks": tasks},
                          versions={**self.versions, **other.versions})

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        return cls.from_dict(read_json(path, "eval result"), source=str(path))

    @property
    def perplexity(self) -> float | None:
        """Perplexity by layerwise's own protocol, if `ppl` was evaluated."""
        value = self.results.get(PPL_TASK, {}).get("perplexity")
        return None if value is None else float(value)

    def main_metric(self, task: str) -> tuple[str, float] | None:
        """(metric name, value) that stands for `task` in tables and plots."""
        metrics = self.results.get(task, {})
        for name in MAIN_METRICS:
            if isinstance(metrics.get(name), (int, float)):
                return name, float(metrics[name])
        return None

    def to_text(self) -> str:
        lines = [f"model: {self.model}"]
        for task, metrics in self.results.items():
            shown = []
            for name, value in metrics.items():
                if name.endswith("_stderr") or name in ("protocol_description", "alias"):
                    continue
                shown.append(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")
            lines.append(f"{task}: " + ", ".join(shown))
        return "\n".join(lines)
