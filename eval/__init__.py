"""Evaluation of (compressed) models: perplexity under a fixed, named protocol, lm-eval tasks (including
layerwise's offline ``wiki_mc`` and ``wiki_ppl``), and comparison reports.

    from layerwise.eval import evaluate, report
    result = evaluate("smollm2-3.25b", tasks="ppl,wiki_mc")     # EvalResult
    result.to_dict()["results"]["wiki_mc"]["acc"]
    report(["smollm2-135m", "smollm2-3.25b"], "report-dir", tasks="ppl,wiki_mc")

Results JSON (``EvalResult.to_dict()``, ``layerwise eval --json``), schema version 1::

    {"format": "layerwise.eval", "schema_version": 1, "model": "...",
     "results": {"ppl": {"perplexity": ..., "nll": ..., "tokens": ..., "windows": ..., "protocol": ...,
                         "protocol_description": ..., "seconds": ...},
                 "wiki_mc": {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ...,
                             "samples": ..., "seconds": ...}},
     "config": {"tasks": [...], "batch_size": ..., "limit": ..., "num_fewshot": ..., "protocol": {...},
                "include_path": [...], "model_info": {...}},
     "versions": {"layerwise": ..., "torch": ..., "transformers": ..., "lm_eval": ..., "tasks": {...}}}

Keys keep their meaning for the life of schema 1; new keys may appear. Details: `layerwise.eval.results`.
lm-eval is imported only when a task other than ``ppl`` runs (``pip install 'layerwise[eval]'``).
"""

from layerwise.eval.comparison import ReportEntry, report
from layerwise.eval.harness import Evaluator, evaluate, parse_tasks
from layerwise.eval.perplexity import (
    DEFAULT_PROTOCOL,
    PerplexityProtocol,
    PerplexityResult,
    perplexity,
    perplexity_on_windows,
)
from layerwise.eval.results import SCHEMA_VERSION, EvalResult
from layerwise.eval.wiki_tasks import OFFLINE_TASKS

__all__ = [
    "DEFAULT_PROTOCOL",
    "OFFLINE_TASKS",
    "SCHEMA_VERSION",
    "EvalResult",
    "Evaluator",
    "PerplexityProtocol",
    "PerplexityResult",
    "ReportEntry",
    "evaluate",
    "parse_tasks",
    "perplexity",
    "perplexity_on_windows",
    "report",
]
