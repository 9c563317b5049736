"""`report()`: compare an original model with compressed checkpoints, as Markdown, JSON and two plots.

For every input (a layerwise checkpoint directory, a plain HF model directory or the alias of the default
model) the report shows its size on disk, average bits per decoder weight, perplexity, task scores, and
for checkpoints the per-layer plan (bits, pruned, tied, dropped sub-layers) with the importance scores
it was planned from. Scores come from evaluating each input on `tasks`, unless a results JSON written by
``layerwise eval --json`` is given for it (matched by the model it names).

The output directory holds ``report.md``, ``results.json`` (``format: layerwise.output.report``, schema 1: the
per-input facts and each input's full eval result), ``per_layer.png`` (per checkpoint, importance per
layer as bars coloured by the bits allocated; pruned and tied layers hatched) and ``ppl_vs_size.png``
(perplexity, and each task's main metric, against size on disk). It is written to a hidden temporary
directory and renamed into place, so a failed run leaves nothing under the name.

Average bits follow the budget's accounting (`layerwise.core.budget`): bits per decoder linear weight
including scale/zero overhead, a kept layer at 16; the original model therefore shows 16 whatever dtype
its files hold (its size on disk tells that).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerwise.core.errors import LayerwiseError
from layerwise.eval.perplexity import DEFAULT_PROTOCOL, PerplexityProtocol
from layerwise.eval.results import LOWER_IS_BETTER, PPL_TASK, EvalResult

REPORT_FORMAT = "layerwise.report"
REPORT_SCHEMA_VERSION = 1
FILES = ("report.md", "results.json", "per_layer.png", "ppl_vs_size.png")
PLOT_INSTALL = "pip install 'layerwise[eval]'"
MIB = 1024 * 1024
# Colour of a layer's bar by what it became; structural outcomes are grey and hatched.
BIT_COLOURS = {2: "#d7301f", 3: "#fc8d59", 4: "#91bfdb", 8: "#4575b4", 16: "#313695"}
PRUNED_COLOUR, TIED_COLOUR = "#bdbdbd", "#9e9ac8"


@dataclass
class LayerEntry:
    """One decoder layer of a checkpoint's plan, in the original model's numbering."""

    layer: int
    action: str  # keep, quantize, prune, tie
    bits: int | None  # code width of a quantized layer
    bits_per_weight: float | None  # incl. scale/zero overhead; None for a removed layer
    group_size: int | None = None
    method: str | None = None
    score: float | None = None
    tie_to: int | None = None
    drop: list[str] = field(default_factory=list)

    @property
    def removed(self) -> bool:
        return self.action in ("prune", "tie")

    def label(self) -> str:
        """How the layer reads in a table: ``4b g128 gptq``, ``kept``, ``pruned``, ``tied to 3``."""
        if self.action == "prune":
            return "pruned"
        if self.action == "tie":
            return f"tied to {self.tie_to}"
        text = "kept" if self.action == "keep" else f"{self.bits}b g{self.group_size}" + (
            f" {self.method}" if self.method else "")
        return text + (f", {' and '.join(self.drop)} dropped" if self.drop else "")


@dataclass
class ReportEntry:
    """One input of the report: what it is, its size and bits, its layers and its scores."""

    name: str  # short name shown in tables and plots
    source: str  # as given
    kind: str  # "checkpoint" or "model"
    path: str
    size_bytes: int
    avg_bits: float | None
    scorer: str | None = None
    layers: list[LayerEntry] = field(default_factory=list)
    eval: EvalResult | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eval"] = None if self.eval is None else self.eval.to_dict()
        return data


def report(
    inputs: Sequence[str | os.PathLike | None],
    out: str | os.PathLike,
    *,
    tasks: str | Sequence[str] = (PPL_TASK,),
    results: Sequence[str | os.PathLike] = (),
    batch_size: int = 32,
    limit: int | float | None = None,
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
    include_path: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ReportEntry]:
    """Compare `inputs` (checkpoint dirs, model dirs, aliases; None is the default model) and write the
    report to the directory `out`. Inputs with a results JSON in `results` are not evaluated again."""
    from layerwise.output.checkpoint import atomic_dir, check_output_dir
    from layerwise.output.paths import check_not_inside

    if not inputs:
        raise LayerwiseError("nothing to compare; give at least one model or checkpoint")
    check_not_inside(out, inputs, "model or checkpoint")
    check_not_inside(out, results, "results file")
    out = check_output_dir(out, overwrite)
    _check_plotting()
    entries = [describe(spec) for spec in inputs]
    _attach_results(entries, [EvalResult.load(p) for p in results], [str(p) for p in results])
    pending = [e for e in entries if e.eval is None]
    if pending:
        from layerwise.eval.harness import Evaluator

        evaluator = Evaluator(tasks, batch_size=batch_size, limit=limit, protocol=protocol,
                              include_path=include_path)
        for entry in pending:
            entry.eval = evaluator(entry.source or None, progress=progress)
    with atomic_dir(out) as tmp:
        (tmp / "report.md").write_text(markdown(entries))
        data = {"format": REPORT_FORMAT, "schema_version": REPORT_SCHEMA_VERSION,
                "inputs": [e.to_dict() for e in entries]}
        (tmp / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        plot_per_layer(entries, tmp / "per_layer.png")
        plot_ppl_vs_size(entries, tmp / "ppl_vs_size.png")
    return entries


# ------------------------------------------------------------------------------------------- the inputs


def describe(spec: str | os.PathLike | None) -> ReportEntry:
    """Everything about one input that needs no model loaded: kind, path, size, bits, per-layer plan."""
    from layerwise.model.loading import model_name, resolve_model_path
    from layerwise.output.checkpoint import is_checkpoint, read_meta

    source = "" if spec is None else str(spec)
    if source and is_checkpoint(source):
        meta = read_meta(source)
        path = Path(source)
        layers, scorer = _layers(meta)
        avg_bits = (meta.get("report") or {}).get("avg_bits", (meta.get("plan") or {}).get("avg_bits"))
        return ReportEntry(name=_short(source), source=source, kind="checkpoint", path=str(path.resolve()),
                           size_bytes=_size(path), avg_bits=avg_bits, scorer=scorer, layers=layers)
    if source and Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise LayerwiseError(
            f"directory {source} is not a Hugging Face model (no config.json) nor a layerwise checkpoint (no "
            "layerwise.json); pass checkpoints written by `layerwise compress` or model directories"
        )
    from layerwise.core.budget import KEEP_BITS

    path = resolve_model_path(source or None)
    return ReportEntry(name=model_name(source or None).rstrip("/").split("/")[-1], source=source, kind="model",
                       path=str(Path(path).resolve()), size_bytes=_size(Path(path)), avg_bits=float(KEEP_BITS))


def _layers(meta: dict[str, Any]) -> tuple[list[LayerEntry], str | None]:
    from layerwise.core.types import Plan

    plan = Plan.from_dict(meta["plan"])
    report_rows = {r.get("layer"): r for r in (meta.get("report") or {}).get("rows", [])}
    scores_data = meta.get("scores") or {}
    scores = scores_data.get("scores") or []
    scorer = scores_data.get("scorer") or (meta.get("report") or {}).get("scorer")
    # Scores number the original layers, or (scored after pruning) only the kept ones.
    numbering = range(plan.n_layers) if len(scores) == plan.n_layers else plan.kept_layers()
    score_of = dict(zip(numbering, scores, strict=False)) if len(scores) == len(numbering) else {}
    layers = []
    for action in plan.layers:
        row = report_rows.get(action.layer, {})
        score = row.get("score", score_of.get(action.layer))
        layers.append(LayerEntry(
            layer=action.layer, action=action.action, bits=action.bits if action.action == "quantize" else None,
            bits_per_weight=None if action.removed else row.get("avg_bits"),
            group_size=action.group_size if action.action == "quantize" else None,
            method=action.method if action.action == "quantize" else None,
            score=None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score),
            tie_to=action.tie_to, drop=list(action.drop),
        ))
    return layers, scorer


def _attach_results(entries: list[ReportEntry], loaded: list[EvalResult], files: list[str]) -> None:
    """Give each results JSON to the input it was measured on (by resolved path, else by the name as given)."""
    for result, file in zip(loaded, files, strict=True):
        path = (result.config.get("model_info") or {}).get("path")
        matches = [e for e in entries if (path and path == e.path) or result.model in (e.source, e.name)]
        if not matches:
            known = ", ".join(e.source or e.name for e in entries)
            raise LayerwiseError(f"results {file} are for model {result.model!r}, which is not among the inputs "
                                 f"({known}); add it, or drop the file")
        for entry in matches:  # several files for one input: their tasks are combined, later files win
            entry.eval = result if entry.eval is None else entry.eval.merged(result)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _short(source: str) -> str:
    return Path(source.rstrip("/\\")).name or source


# ---------------------------------------------------------------------------------------------- markdown


def _tasks_of(entries: list[ReportEntry]) -> list[str]:
    """Tasks in the order first seen, layerwise's perplexity first."""
    seen: dict[str, None] = {}
    for entry in entries:
        for task in (entry.eval.results if entry.eval else {}):
            seen.setdefault(task)
    return sorted(seen, key=lambda t: t != PPL_TASK)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def markdown(entries: list[ReportEntry]) -> str:
    tasks = _tasks_of(entries)
    head = ["model", "kind", "size (MiB)", "avg bits"]
    metric_of: dict[str, str | None] = {}
    for task in tasks:
        found = [e.eval.main_metric(task) for e in entries if e.eval and e.eval.main_metric(task)]
        metric_of[task] = found[0][0] if found else None
        title = task if task == PPL_TASK else f"{task} {metric_of[task] or ''}".strip()
        head.append(title + (" ↓" if metric_of[task] in LOWER_IS_BETTER else " ↑" if metric_of[task] else ""))
    lines = ["# layerwise comparison report", ""]
    protocols = {e.eval.results[PPL_TASK].get("protocol_description") for e in entries
                 if e.eval and PPL_TASK in e.eval.results} - {None, ""}
    lines += [
        "Size: all files in the model's directory. Avg bits: bits per decoder linear weight, scale/zero "
        "overhead included, a kept layer counting 16 (so the original shows 16 whatever its dtype on disk).",
    ]
    if protocols:
        lines.append(f"ppl: layerwise's protocol, {'; '.join(sorted(protocols))}.")
    lines += ["", "## Summary", "", _row(head), _row(["---"] * len(head))]
    for e in entries:
        cells = [e.name, e.kind, f"{e.size_bytes / MIB:,.1f}", _fmt(e.avg_bits)]
        for task in tasks:
            metric = metric_of[task]
            value = e.eval.results.get(task, {}).get(metric) if (e.eval and metric) else None
            cells.append(_fmt(value, 2 if metric in LOWER_IS_BETTER else 3))
        lines.append(_row(cells))
    details = [t for t in tasks if t != PPL_TASK]
    if details:
        lines += ["", "## Task metrics", "", _row(["model", "task", "metric", "value", "stderr", "documents"]),
                  _row(["---"] * 6)]
        for e in entries:
            for task in details:
                metrics = e.eval.results.get(task, {}) if e.eval else {}
                for metric, value in metrics.items():
                    if metric.endswith("_stderr") or metric == "seconds" or not isinstance(value, float):
                        continue
                    lines.append(_row([e.name, task, metric, _fmt(value, 4), _fmt(metrics.get(f"{metric}_stderr"), 4),
                                       _fmt(metrics.get("samples"))]))
    checkpoints = [e for e in entries if e.layers]
    if checkpoints:
        lines += ["", "## Per-layer plan", "",
                  "Each checkpoint: what the layer became (bits, group size, method; kept, pruned, tied, dropped "
                  "sub-layers), bits per weight with overhead, and the importance score it was planned from.", ""]
        head = ["layer"]
        for e in checkpoints:
            head += [f"{e.name}", "bits/w", f"score ({e.scorer or '–'})"]
        lines += [_row(head), _row(["---"] * len(head))]
        n_layers = max(len(e.layers) for e in checkpoints)
        for i in range(n_layers):
            cells = [str(i)]
            for e in checkpoints:
                layer = e.layers[i] if i < len(e.layers) else None
                cells += ["" if layer is None else layer.label(),
                          "" if layer is None else _fmt(layer.bits_per_weight, 2),
                          "" if layer is None else _fmt(layer.score, 4)]
            lines.append(_row(cells))
    lines += ["", "Plots: per_layer.png (importance per layer, coloured by bits), ppl_vs_size.png.", ""]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


# ------------------------------------------------------------------------------------------------- plots


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LayerwiseError(f"the report's plots need matplotlib, which is not installed; run `{PLOT_INSTALL}`") \
            from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(layer: LayerEntry) -> tuple[str, str]:
    """(face colour, hatch) of a layer's bar."""
    if layer.action == "prune":
        return PRUNED_COLOUR, "///"
    if layer.action == "tie":
        return TIED_COLOUR, "\\\\\\"
    bits = 16 if layer.action == "keep" else (layer.bits or 16)
    return BIT_COLOURS.get(bits, "#756bb1"), ("..." if layer.drop else "")


def plot_per_layer(entries: list[ReportEntry], path: Path) -> None:
    """One panel per checkpoint: a bar per layer, its height the importance score (or, without scores,
    the bits per weight), its colour the bits allocated; pruned and tied layers grey and hatched."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    checkpoints = [e for e in entries if e.layers]
    n = max(1, len(checkpoints))
    fig, axes = plt.subplots(n, 1, figsize=(max(8.0, 0.32 * max((len(e.layers) for e in checkpoints), default=10)
                                                + 2), 2.6 * n + 0.9), squeeze=False)
    if not checkpoints:
        axes[0][0].text(0.5, 0.5, "no checkpoints among the inputs: nothing to show per layer", ha="center",
                        va="center")
        axes[0][0].set_axis_off()
    used: dict[str, Patch] = {}
    for ax, entry in zip(axes[:, 0], checkpoints, strict=False):
        xs = [layer.layer for layer in entry.layers]
        scored = all(layer.score is not None for layer in entry.layers)
        heights = [layer.score if scored else (layer.bits_per_weight or 0.0) for layer in entry.layers]
        if not scored:  # a removed layer costs no bits: a short stub keeps it visible
            stub = 0.12 * max(max(heights), 1.0)
            heights = [stub if layer.removed and not h else h for h, layer in zip(heights, entry.layers, strict=True)]
        bottom = 0.0
        if scored and min(heights) < 0:  # e.g. LIM (-cos): start the bars below the lowest so all show
            span = (max(heights) - min(heights)) or abs(min(heights)) or 1.0
            bottom = min(heights) - 0.1 * span
        for x, h, layer in zip(xs, heights, entry.layers, strict=True):
            face, hatch = _colour(layer)
            ax.bar(x, h - bottom, bottom=bottom, color=face, hatch=hatch, edgecolor="#444444", linewidth=0.5)
            label = _legend_label(layer)
            used.setdefault(label, Patch(facecolor=face, hatch=hatch, edgecolor="#444444", label=label))
            if layer.action in ("prune", "tie"):
                ax.text(x, h, "P" if layer.action == "prune" else f"T{layer.tie_to}", ha="center", va="bottom",
                        fontsize=7)
        if scored and min(heights) > 0 and max(heights) / min(heights) > 50:
            ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
        ax.set_ylabel(f"importance\n({entry.scorer})" if scored else "bits / weight", fontsize=8)
        bits = "" if entry.avg_bits is None else f", {entry.avg_bits:.2f} bits avg"
        ax.set_title(f"{entry.name}{bits}", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1][0].set_xlabel("decoder layer")
    if used:
        order = sorted(used, key=_legend_order)
        fig.legend(handles=[used[k] for k in order], loc="upper center", ncol=min(len(order), 7), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.6 * n + 0.9)))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _legend_label(layer: LayerEntry) -> str:
    if layer.action == "prune":
        return "pruned"
    if layer.action == "tie":
        return "tied"
    base = "16 (kept)" if layer.action == "keep" else f"{layer.bits}-bit"
    return base + (" + sub-layer dropped" if layer.drop else "")


def _legend_order(label: str) -> tuple[int, str]:
    head = label.split("-")[0].split(" ")[0]
    return (int(head), label) if head.isdigit() else (100, label)


def plot_ppl_vs_size(entries: list[ReportEntry], path: Path) -> None:
    """Perplexity (and each other task's main metric, one panel each) against size on disk.

    Each input keeps one colour across panels (a star for an original model, a dot for a checkpoint),
    named in the shared legend; inputs that land on the same point share one label.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    tasks = _tasks_of(entries) or [PPL_TASK]
    colours = plt.get_cmap("tab10")
    style = {id(e): ("*" if e.kind == "model" else "o", colours(i % 10)) for i, e in enumerate(entries)}
    panels = []
    for task in tasks:
        points, metric = [], None
        for e in entries:
            found = e.eval.main_metric(task) if e.eval else None
            if found:
                metric = found[0]
                points.append((e, found[1]))
        panels.append((task, metric, points))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), squeeze=False)
    for ax, (task, metric, points) in zip(axes[0], panels, strict=True):
        if not points:
            ax.text(0.5, 0.5, f"no {task} measured", ha="center", va="center")
            ax.set_axis_off()
            continue
        for e, value in points:
            marker, colour = style[id(e)]
            ax.scatter(e.size_bytes / MIB, value, s=170 if marker == "*" else 60, marker=marker, color=colour,
                       edgecolor="#222222", linewidth=0.6, zorder=3)
        values = [v for _, v in points]
        log = metric in LOWER_IS_BETTER and min(values) > 0 and max(values) / min(values) > 3
        if log:
            ax.set_yscale("log")
        sizes = [e.size_bytes / MIB for e, _ in points]
        pad = 0.12 * ((max(sizes) - min(sizes)) or max(sizes) or 1.0)
        ax.set_xlim(max(0.0, min(sizes) - pad), max(sizes) + 3.5 * pad)  # room for the labels
        ax.margins(y=0.12)
        for (x, y), names in _coincident([(e.size_bytes / MIB, v) for e, v in points], [e.name for e, _ in points],
                                         (max(sizes) - min(sizes)) or 1.0, values, log):
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(7, 6), fontsize=8)
        label = "perplexity (layerwise protocol)" if task == PPL_TASK else f"{task} {metric}"
        better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        ax.set_ylabel(f"{label}\n({better})", fontsize=9)
        ax.set_xlabel("size on disk (MiB)", fontsize=9)
        ax.set_title(f"{label} vs size", fontsize=10)
        ax.grid(alpha=0.3)
        ax.grid(alpha=0.08, which="minor")
    handles = [Line2D([], [], linestyle="", marker=style[id(e)][0], color=style[id(e)][1], markeredgecolor="#222222",
                      markersize=11 if e.kind == "model" else 7, label=f"{e.name} ({e.kind})") for e in entries]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _coincident(points: list[tuple[float, float]], names: list[str], x_span: float, values: list[float],
                log: bool) -> list[tuple[tuple[float, float], list[str]]]:
    """Points whose labels would collide (within 10 % of the x span and 3 % of the y span), one label each."""
    def y_of(v: float) -> float:
        return math.log(v) if log else v

    y_span = (max(map(y_of, values)) - min(map(y_of, values))) or 1.0
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for (x, y), name in zip(points, names, strict=True):
        for (gx, gy), members in groups:
            if abs(gx - x) <= 0.1 * x_span and abs(y_of(gy) - y_of(y)) <= 0.03 * y_span:
                members.append(name)
                break
        else:
            groups.append(((x, y), [name]))
    return groups
