"""The `layerwise` command line: score, plan, apply, compress, export, eval, report.

Every failure the user can fix is a `LayerwiseError`, printed as one line with exit code 2; a bad flag
value (a number out of range, NaN) is an argparse error, one line with exit code 2 too. --device/--dtype,
and outputs (never inside an input), are checked before any slow work starts; outputs are written
atomically at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import DEFAULT_GRID, GRANULARITIES, GRIDS
from layerwise.core.validate import parse_number
from layerwise.data.corpora import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS
from layerwise.engine.recipe import DEFAULT_METHOD
from layerwise.importance.sensitivity import DEFAULT_OPTIONS
from layerwise.model.device import DTYPE_ALIASES, DTYPES
from layerwise.output.export import EXPORT_FORMATS
from layerwise.output.export_common import TARGETS
from layerwise.planning.planners import ORDERS, LwqConfig
from layerwise.planning.structure import DEFAULT_PRUNE_SCORER, TIE_MODES
from layerwise.transform import AUTO

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_BITS = 3.25


def _number(name: str) -> Callable[[str], int | float]:
    """An argparse ``type=`` reading a flag by its rule in `layerwise.core.validate` (NaN, infinities and
    out-of-range values refused in one line naming the flag, what is allowed and an example)."""

    def convert(text: str) -> int | float:
        try:
            return parse_number(name, text)
        except LayerwiseError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local HF directory, hub id, or the built-in alias smollm2-135m (default)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wikipedia",
                   help="calibration text: a built-in corpus (wikipedia, pydoc, britannica) or a UTF-8 text file")
    p.add_argument("--calib-windows", type=_number("calib_windows"), default=DEFAULT_CALIB_WINDOWS,
                   help=f"number of calibration windows (default {DEFAULT_CALIB_WINDOWS})")
    p.add_argument("--calib-len", type=_number("calib_len"), default=DEFAULT_CALIB_LEN,
                   help=f"tokens per calibration window (default {DEFAULT_CALIB_LEN})")

GRANULARITY_HELP = ("what gets one option each: a decoder layer, each linear module (module), or each module with "
                    "vLLM's fused q/k/v and gate/up sets together (fused; --target vllm turns module into fused). "
                    "Finer units run one damage measurement per unit")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=_number("bits"), default=None,
                   help="average bits per decoder weight incl. scale/zero overhead (compress default: 3.25)")
    p.add_argument("--n-low", type=_number("n_low"), default=None,
                   help="instead of --bits: put exactly this many layers at the low width")
    p.add_argument("--planner", default=None,
                   help=f"planner: {_names('planner')} (default: optimal if the scorer measured damage per "
                        "option, e.g. sensitivity; else lwq)")
    # Planner settings default to None ("not given"): only what the user set is passed on, and a planner
    # refuses a setting it does not take. The defaults shown are lwq's (LwqConfig).
    default = {f.name: f.default for f in fields(LwqConfig)}
    p.add_argument("--high", type=_number("high"), default=None,
                   help=f"bit width of the important layers (default {default['high']})")
    p.add_argument("--low", type=_number("low"), default=None,
                   help=f"bit width of the other layers (default {default['low']})")
    p.add_argument("--group-size", type=_number("group_size"), default=None,
                   help=f"input columns per scale/zero group (default {default['group_size']})")
    p.add_argument("--sym", action="store_true", default=None,
                   help="symmetric quantization (no stored zero; default asymmetric)")
    p.add_argument("--order", default=None, choices=list(ORDERS),
                   help=f"which layers get the high width: most important (default {default['order']}), least "
                        "(reverse), or random")
    p.add_argument("--seed", type=_number("seed"), default=None, help=f"seed for --order random (default "
                                                                      f"{default['seed']})")
    p.add_argument("--options", default=None,
                   help="candidate options for --planner optimal, bits:group[:method[:sym]] comma-separated "
                        f"(default: {DEFAULT_OPTIONS} for compress; every measured option for plan)")
    p.add_argument("--granularity", default=None, choices=list(GRANULARITIES),
                   help=GRANULARITY_HELP + " (default: layer for compress, module with --target gguf; as the "
                                           "scores were measured for plan)")


def _add_grid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=DEFAULT_GRID, choices=list(GRIDS),
                   help=f"how each group's scale and zero are chosen: minmax, the group's range (default "
                        f"{DEFAULT_GRID}), or mse, a search for the least squared error (weighted by the "
                        "Hessian diagonal under gptq)")


def _add_structure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", type=_number("prune"), default=0, metavar="N", help="remove N decoder layers (default 0)")
    p.add_argument("--prune-block", action="store_true",
                   help="prune one contiguous block of N layers by angular distance (Gromov et al.)")
    p.add_argument("--drop-attn", type=_number("drop_attn"), default=0, metavar="N",
                   help="drop N attention sub-layers, the least important by the sublayer scorer")
    p.add_argument("--drop-mlp", type=_number("drop_mlp"), default=0, metavar="N",
                   help="drop N MLP sub-layers (sublayer scorer)")
    p.add_argument("--tie", type=_number("tie"), default=0, metavar="N",
                   help="remove N layers by tying them to a neighbour's weights (tie scorer: least measured damage)")
    p.add_argument("--tie-mode", default="first", choices=list(TIE_MODES),
                   help="a run of tied layers uses its first layer's weights (default) or their average")


def _add_placement(p: argparse.ArgumentParser) -> None:
    dtypes = "|".join(DTYPES)
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model runs: auto (default: cuda if torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, metavar=dtypes,
                   help=f"float type to load and run the model in ({dtypes}; aliases "
                        f"{', '.join(DTYPE_ALIASES)}); default: float32 on the CPU, the checkpoint's own on a GPU. "
                        "float16 is refused on the CPU (use bfloat16)")


def _add_rotate(p: argparse.ArgumentParser, default: str | None) -> None:
    from layerwise.transform import ROTATION_KINDS

    said = ("auto (default): hadamard where the architecture allows R1, the head is not tied to the embeddings "
            "(untying costs vocab x hidden parameters), the method reads a Hessian (gptq, gptaq) and the model is "
            "not streamed; else none" if default == AUTO else "off by default")
    p.add_argument("--rotate", default=default, metavar="KIND[:r1|:r2]|auto|none", type=_rotation,
                   help="fuse orthogonal rotations into the weights before scoring and quantizing "
                        f"({', '.join(ROTATION_KINDS)}; hadamard = R1 on the residual stream, norms folded, tied "
                        f"head untied, + R2 on each head's values; hadamard:r2 for R2 alone; none). {said}. An "
                        "explicit rotation is refused with --stream")
    p.add_argument("--rotate-seed", type=_number("rotate_seed"), default=0,
                   help="seed of the rotations' random signs (default 0)")


def _rotation(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "off") else text


def _add_output(p: argparse.ArgumentParser, flag: str, help_text: str, required: bool = True) -> None:
    p.add_argument(flag, required=required, help=help_text)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    from layerwise.eval.wiki_tasks import OFFLINE_TASKS

    p.add_argument("--tasks", default="ppl",
                   help="comma-separated: ppl (layerwise's perplexity protocol, default), the offline tasks "
                        f"{', '.join(OFFLINE_TASKS)}, or lm-eval task names (needs pip install 'layerwise[eval]')")
    p.add_argument("--batch-size", type=_number("batch_size"), default=32,
                   help="lm-eval requests per forward (default 32); rolling perplexity and ppl go one window at a time")
    p.add_argument("--limit", type=_number("limit"), default=None,
                   help="at most this many documents per lm-eval task (a fraction if below 1); for quick checks")
    p.add_argument("--num-fewshot", type=_number("num_fewshot"), default=None,
                   help="few-shot examples for lm-eval tasks")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a directory of your own lm-eval task YAMLs (repeatable)")
    p.add_argument("--max-tokens", type=_number("max_tokens"), default=None,
                   help="ppl: evaluation tokens (default: the protocol's 16384)")
    p.add_argument("--window", type=_number("window"), default=None,
                   help="ppl: window length (default: the protocol's 1024)")


def _names(kind: str) -> str:
    """The registered names of one kind, so the help lists exactly what the API accepts."""
    from layerwise.importance import SCORERS
    from layerwise.planning.planners import PLANNERS
    from layerwise.quant import QUANTIZERS

    registry = {"scorer": SCORERS, "planner": PLANNERS, "method": QUANTIZERS}[kind]
    return ", ".join(registry.names())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the flag, what is allowed, an example), as every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerwise", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text))
    return parser


def _add_score_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--scorer", default="lim", help=f"importance scorer: {_names('scorer')} (default lim)")
    p.add_argument("--options", default=None,
                   help="options the sensitivity scorer measures, bits:group[:method[:sym]] comma-separated "
                        f"(default {DEFAULT_OPTIONS})")
    p.add_argument("--method", default="rtn", help="method of options that name none (sensitivity scorer)")
    p.add_argument("--granularity", default=None, choices=list(GRANULARITIES),
                   help=GRANULARITY_HELP + " (sensitivity scorer; default layer)")
    _add_calib(p)
    _add_placement(p)
    _add_output(p, "--json", "where to write the scores JSON")


def _add_plan_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", required=True, help="scores JSON written by `layerwise score`")
    _add_plan_options(p)
    p.add_argument("--method", default=None,
                   help=f"method to write into the plan: {_names('method')} (default: chosen at apply)")
    _add_output(p, "--out", "where to write the plan JSON")


def _add_apply_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--plan", required=True, help="plan JSON (from `layerwise plan`, possibly edited)")
    p.add_argument("--method", default="rtn",
                   help=f"method for actions that name none: {_names('method')} (default rtn)")
    _add_grid(p)
    _add_calib(p)
    p.add_argument("--tie-mode", default="first", choices=list(TIE_MODES),
                   help="tied layers use their representative's weights (default) or the run's average")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    _add_rotate(p, None)
    _add_placement(p)
    _add_output(p, "--out", "checkpoint directory to write")


def _add_compress_parser(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--uniform", type=_number("uniform"), default=None, metavar="BITS",
                   help="skip scoring and planning: every layer at BITS bits with --group-size")
    p.add_argument("--scorer", default=None,
                   help=f"importance scorer: {_names('scorer')}. Picks the layers to prune when --prune is given "
                        f"(default {DEFAULT_PRUNE_SCORER}); otherwise allocates the bits (default sensitivity)")
    p.add_argument("--bits-scorer", default=None,
                   help="with --prune and --bits: the scorer that allocates bits among the layers left "
                        "(default sensitivity)")
    _add_structure(p)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"quantization method: {_names('method')} (default {DEFAULT_METHOD})")
    _add_grid(p)
    _add_plan_options(p)
    _add_calib(p)
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="compress from the safetensors files one decoder layer at a time, writing each as it "
                        "finishes (default: stream when the float32 weights exceed 40%% of available memory)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted streamed compression into --out from its last finished layer "
                        "(same arguments; implies --stream)")
    _add_rotate(p, AUTO)
    p.add_argument("--target", choices=["gguf", "vllm"], default=None,
                   help="the engine the checkpoint is for: gguf quantizes to llama.cpp types (default options "
                        "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0 at their real bits per weight, a type per tensor from damage "
                        "measured per module; export with --format gguf); "
                        "vllm refuses llama.cpp types (export with --format compressed-tensors --target vllm)")
    _add_placement(p)
    _add_output(p, "--out", "checkpoint directory to write")


def _add_export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="layerwise checkpoint directory")
    p.add_argument("--format", default="hf", choices=list(EXPORT_FORMATS),
                   help="hf: plain Hugging Face directory (pruned-only checkpoints); compressed-tensors: "
                        "pack-quantized with per-module bits (transformers, vLLM); quanto: optimum-quanto "
                        "qint2/qint4/qint8 (QuantizedModelForCausalLM); gguf: one llama.cpp file, each decoder "
                        "linear in its plan's type (--options q4_k,q3_k,... quantize to them directly)")
    p.add_argument("--target", choices=list(TARGETS), default=None,
                   help="also refuse what this engine cannot load (vllm: q/k/v and gate/up, which it fuses, must "
                        "share one scheme); docs/export.md says which of its kernels runs which scheme")
    p.add_argument("--three-bit-as-four", action="store_true",
                   help="compressed-tensors: write 3-bit modules on the 4-bit grid (4 bits per weight, exact) for "
                        "readers older than dense 3-bit packing (compressed-tensors < 0.18)")
    p.add_argument("--gguf-embeddings", choices=["q8_0", "f16", "f32"], default="q8_0",
                   help="gguf: the type of the embedding and of an untied head (default q8_0, llama.cpp's choice "
                        "when rows are not whole 256-weight super-blocks; f32 keeps them exactly)")
    p.add_argument("--verbose", action="store_true", help="on a refusal, list every module it concerns")
    _add_output(p, "--out", "directory to write (a file for --format gguf)")


def _add_eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory, HF directory, hub id or alias")
    _add_eval_options(p)
    _add_placement(p)
    _add_output(p, "--json", "where to write the result JSON", required=False)


def _add_report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="MODEL_OR_CKPT",
                   help="checkpoint directories, HF model directories or the alias smollm2-135m")
    p.add_argument("--results", nargs="+", default=[], metavar="FILE",
                   help="JSON files from `layerwise eval --json`; the inputs they name are not evaluated again")
    _add_eval_options(p)
    _add_output(p, "--out", "directory to write report.md, results.json, per_layer.png and ppl_vs_size.png")


def _protocol(max_tokens: int | None = None, window: int | None = None):
    from dataclasses import replace

    from layerwise.eval import DEFAULT_PROTOCOL

    if max_tokens is None and window is None:
        return DEFAULT_PROTOCOL
    changes: dict[str, Any] = {}
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    if window is not None:
        changes["window_len"] = window
    custom = replace(DEFAULT_PROTOCOL, **changes)
    return replace(custom, name=f"wiki-{custom.max_tokens}tok-w{custom.window_len}")


def _check_json_out(path: str, overwrite: bool) -> None:
    from layerwise.output.checkpoint import check_writable

    if Path(path).exists() and not overwrite:
        raise LayerwiseError(f"output {path} already exists; choose another path or pass --overwrite")
    if not Path(path).parent.exists():
        raise LayerwiseError(f"directory {Path(path).parent} does not exist; create it or choose another path")
    check_writable(Path(path))


def _perplexity(model, tokenizer, progress: bool, label: str, placement: dict[str, Any]) -> float:
    from layerwise.eval import DEFAULT_PROTOCOL, perplexity
    from layerwise.model.placement import placement_for

    result = perplexity(model, tokenizer, DEFAULT_PROTOCOL, progress=progress,
                        placement=placement_for(placement["device"], placement["dtype"]))
    print(f"perplexity {label}: {result.perplexity:.3f} ({result.protocol}, {result.tokens} tokens)")
    return result.perplexity


def _finish_checkpoint(result, out: str, overwrite: bool, ppl_before: float | None, progress: bool,
                       placement: dict[str, Any]) -> None:
    from layerwise.api import save
    from layerwise.eval import DEFAULT_PROTOCOL

    if ppl_before is not None:
        ppl_after = _perplexity(result.model, result.tokenizer, progress, "after", placement)
        result.report.metrics.update(perplexity_before=ppl_before, perplexity_after=ppl_after,
                                     perplexity_protocol=DEFAULT_PROTOCOL.name)
    print(result.report.to_text())
    save(result, out, overwrite=overwrite)
    print(f"wrote {out}")


def run(args: argparse.Namespace) -> None:
    COMMANDS[args.command][2](args, not args.quiet)


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """--device and --dtype resolved and checked (before anything is loaded); the keyword arguments that
    pass them on, which are none for the CPU in float32 (the API's defaults)."""
    from layerwise.model.device import checkpoint_dtype, resolve_device, resolve_dtype
    from layerwise.output.paths import input_path

    device = resolve_device(args.device)
    source = input_path(args.model) if args.dtype is None and device.type != "cpu" else None
    dtype = resolve_dtype(args.dtype, device, checkpoint_dtype(source))
    return {"device": device, "dtype": dtype}


def _run_score(args: argparse.Namespace, progress: bool) -> None:
    from layerwise import api
    from layerwise.output.paths import check_not_inside

    placement = _placement(args)
    check_not_inside(args.json, [args.model])
    _check_json_out(args.json, args.overwrite)
    scores = api.score(args.model, args.scorer, calib=args.calib, calib_windows=args.calib_windows,
                       calib_len=args.calib_len, options=args.options, method=args.method,
                       granularity=args.granularity, progress=progress, **placement)
    if dist.is_main():
        scores.save(args.json)
    for i, value in enumerate(scores.scores):
        print(f"layer {i:3d}  {args.scorer} {value: .6f}")
    print(f"wrote {args.json} ({scores.seconds:.1f} s)")


def _run_plan(args: argparse.Namespace, progress: bool) -> None:
    from layerwise import api
    from layerwise.core.types import LayerScores
    from layerwise.output.paths import check_not_inside

    check_not_inside(args.out, [args.scores], "scores file")
    _check_json_out(args.out, args.overwrite)
    scores = LayerScores.load(args.scores)
    plan = api.make_plan(scores, args.bits, planner=args.planner, high=args.high, low=args.low,
                         group_size=args.group_size, sym=args.sym, method=args.method, order=args.order,
                         seed=args.seed, n_low=args.n_low, options=args.options, granularity=args.granularity)
    plan.save(args.out)
    bits = ", ".join(f"{b}" for b in plan.bits_per_layer())
    print(f"bits per layer: {bits}\naverage bits (incl. overhead): {plan.avg_bits:.4f}\nwrote {args.out}")


def _run_apply(args: argparse.Namespace, progress: bool) -> None:
    from layerwise import api
    from layerwise.core.types import Plan
    from layerwise.engine.applier import check_plan_fits
    from layerwise.model.adapter import check_finite_weights
    from layerwise.model.loading import load_model
    from layerwise.output.checkpoint import check_output_dir
    from layerwise.output.paths import check_not_inside

    placement = _placement(args)
    check_not_inside(args.out, [args.model])
    check_not_inside(args.out, [args.plan], "plan file")
    check_output_dir(args.out, args.overwrite)
    plan = Plan.load(args.plan)
    model, tokenizer = load_model(args.model, placement["dtype"])
    check_plan_fits(plan, model)
    if args.eval:  # before the perplexity (api.apply checks again, but only after it)
        check_finite_weights(model, args.model)
    ppl_before = _perplexity(model, tokenizer, progress, "before", placement) if args.eval else None
    result = api.apply(model, plan, args.method, tokenizer=tokenizer, calib=args.calib,
                       calib_windows=args.calib_windows, calib_len=args.calib_len, tie_mode=args.tie_mode,
                       rotate=args.rotate, rotate_seed=args.rotate_seed, progress=progress, grid=args.grid,
                       **placement)
    _finish_checkpoint(result, args.out, args.overwrite, ppl_before, progress, placement)


def _run_compress(args: argparse.Namespace, progress: bool) -> None:
    from layerwise import api
    from layerwise.output.checkpoint import check_output_dir
    from layerwise.output.paths import check_not_inside

    placement = _placement(args)
    check_not_inside(args.out, [args.model])
    check_output_dir(args.out, args.overwrite)
    if args.eval and (args.stream or args.resume):
        raise LayerwiseError("--eval needs the whole model in memory; drop --stream/--resume, or evaluate the "
                             "checkpoint afterwards with `layerwise eval`")
    model, tokenizer, ppl_before = args.model, None, None
    if args.eval:
        from layerwise.model.adapter import check_finite_weights
        from layerwise.model.loading import load_model

        model, tokenizer = load_model(args.model, placement["dtype"])
        check_finite_weights(model, args.model)  # before the perplexity (api.compress checks only after it)
        ppl_before = _perplexity(model, tokenizer, progress, "before", placement)
    result = api.compress(model, tokenizer=tokenizer, progress=progress, out=None if args.eval else args.out,
                          overwrite=args.overwrite, **_compress_options(args), **placement)
    result.report.model = args.model or api.DEFAULT_MODEL
    if args.eval:
        _finish_checkpoint(result, args.out, args.overwrite, ppl_before, progress, placement)
    else:
        print(result.report.to_text())
        print(f"wrote {args.out}")


def _compress_options(args: argparse.Namespace) -> dict[str, Any]:
    """`api.compress`'s keyword arguments from the flags: the default budget when none is given, and
    --scorer choosing what to prune (the layers left then allocated by --bits-scorer) under --prune."""
    structural = bool(args.prune or args.drop_attn or args.drop_mlp or args.tie)
    bits = args.bits
    if bits is None and args.n_low is None and args.uniform is None and not structural:
        bits = DEFAULT_BITS
    scorer, prune_scorer = args.scorer, None
    if args.prune:
        scorer, prune_scorer = args.bits_scorer, args.scorer
    # Planner settings left unset are None: "not given" (a planner refuses a setting it does not take).
    return dict(bits=bits, scorer=scorer or "sensitivity", planner=args.planner, method=args.method,
                group_size=args.group_size, high=args.high, low=args.low, sym=args.sym, order=args.order,
                seed=args.seed, n_low=args.n_low, options=args.options, granularity=args.granularity,
                uniform=args.uniform, prune=args.prune,
                prune_block=args.prune_block, prune_scorer=prune_scorer, drop_attn=args.drop_attn,
                drop_mlp=args.drop_mlp, tie=args.tie, tie_mode=args.tie_mode, calib=args.calib,
                calib_windows=args.calib_windows, calib_len=args.calib_len, stream=args.stream, resume=args.resume,
                grid=args.grid, rotate=args.rotate, rotate_seed=args.rotate_seed, target=args.target)


def _run_export(args: argparse.Namespace, progress: bool) -> None:
    from layerwise.output.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, args.format, overwrite=args.overwrite,
                      three_bit_as_four=args.three_bit_as_four, target=args.target,
                      gguf_embeddings=args.gguf_embeddings)
    print(f"wrote {args.out} ({args.format})")


def _run_eval(args: argparse.Namespace, progress: bool) -> None:
    from layerwise.eval import evaluate
    from layerwise.output.paths import check_not_inside

    placement = _placement(args)
    if args.json:
        check_not_inside(args.json, [args.model], "model or checkpoint")
        _check_json_out(args.json, args.overwrite)
    result = evaluate(args.model, args.tasks, batch_size=args.batch_size, limit=_limit(args.limit),
                      num_fewshot=args.num_fewshot, protocol=_protocol(args.max_tokens, args.window),
                      include_path=args.include_path, progress=progress, **placement)
    _print_eval(result)
    if args.json:
        if dist.is_main():
            result.save(args.json)
        print(f"wrote {args.json}")


def _run_report(args: argparse.Namespace, progress: bool) -> None:
    from layerwise.eval import report

    entries = report(args.inputs, args.out, tasks=args.tasks, results=args.results, batch_size=args.batch_size,
                     limit=_limit(args.limit), protocol=_protocol(args.max_tokens, args.window),
                     include_path=args.include_path, overwrite=args.overwrite, progress=progress)
    for entry in entries:
        bits = "" if entry.avg_bits is None else f", {entry.avg_bits:.3f} bits"
        ppl = entry.eval.perplexity if entry.eval else None
        print(f"{entry.name}: {entry.size_bytes / 2**20:.1f} MiB{bits}"
              + ("" if ppl is None else f", perplexity {ppl:.3f}"))
    print(f"wrote {args.out} (report.md, results.json, per_layer.png, ppl_vs_size.png)")


# name -> (help, adds its flags, runs it)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, bool], None]]] = {
    "score": ("score the importance of every decoder layer", _add_score_parser, _run_score),
    "plan": ("turn scores and a budget into a per-layer plan", _add_plan_parser, _run_plan),
    "apply": ("quantize a model as a plan says and write a checkpoint", _add_apply_parser, _run_apply),
    "compress": ("score, plan and apply in one step", _add_compress_parser, _run_compress),
    "export": ("write a checkpoint in a format other loaders read", _add_export_parser, _run_export),
    "eval": ("perplexity and lm-eval tasks of a model or checkpoint", _add_eval_parser, _run_eval),
    "report": ("compare the original model and compressed checkpoints (Markdown + plots)", _add_report_parser,
               _run_report),
}


def _limit(value: float | None) -> int | float | None:
    """--limit 50 means 50 documents (an int for lm-eval); --limit 0.1 means a tenth."""
    return int(value) if value is not None and value >= 1 and value == int(value) else value


def _print_eval(result) -> None:
    for task, metrics in result.results.items():
        if task == "ppl":  # the lines `layerwise eval` has always printed
            print(f"perplexity: {metrics['perplexity']:.3f}\nprotocol: {metrics['protocol_description']}\n"
                  f"tokens: {metrics['tokens']}  ({metrics['seconds']:.1f} s)")
            continue
        shown = []
        for name, value in metrics.items():
            if isinstance(value, float) and not name.endswith("_stderr") and name != "seconds":
                stderr = metrics.get(f"{name}_stderr")
                shown.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else ""))
        timing = f"  ({metrics['seconds']:.1f} s)" if "seconds" in metrics else ""
        print(f"{task}: {', '.join(shown)}  [{metrics.get('samples', '?')} docs]{timing}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # One line each on stderr as they happen, not file:line and source; under torchrun, results are printed
        # by rank 0 alone (every rank computes the same ones).
        with warnings.catch_warnings(), contextlib.redirect_stdout(_MainRank(sys.stdout)):
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            run(args)
        dist.leave()  # after the block: a rank that left its group would count as the main one there
    except LayerwiseError as exc:
        if dist.claim_error():  # every rank may refuse the same input: one line for the group
            print(f"layerwise: error: {dist.where()}{exc}", file=sys.stderr)
            if getattr(args, "verbose", False) and exc.details:
                print("\n".join(f"  {line}" for line in exc.details), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("layerwise: interrupted; nothing was written under the output name", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if isinstance(exc, dist.MainFailed):  # rank 0 failed in work it did for the group, and says why
            return EXIT_USAGE if exc.refused else EXIT_FAILED
        if dist.is_peer_failure(exc):  # the rank that failed said why; a killed one could not
            if not dist.error_reported():
                print(f"layerwise: error: {dist.where()}another process of the group stopped without a message "
                      f"(killed, or out of memory?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                      "nothing was written under the output name", file=sys.stderr)
            return EXIT_FAILED
        if dist.ranks() is None:
            raise
        if dist.claim_error():
            print(f"layerwise: error: {dist.where()}{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


class _MainRank(io.TextIOBase):
    """`stream` on rank 0 of a process group (or alone); nothing on the other ranks."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text) if dist.is_main() else len(text)

    def flush(self) -> None:
        self.stream.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    if dist.is_main():  # every rank of a group meets the same conditions: say it once
        print(f"layerwise: warning: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
