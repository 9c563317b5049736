"""The format names written into files are a contract with files already on disk.

Moving a module must not rename them: an earlier move rewrote `layerwise.checkpoint` to the
module path by accident, and older checkpoints would then have been refused.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every "format" value layerwise has ever written; the names predate the package layout.
RELEASED = {
    ("compress/output/checkpoint.py", "FORMAT"): "layerwise.checkpoint",
    ("compress/engine/recipe.py", "RECIPE_FORMAT"): "layerwise.recipe",
    ("compress/engine/streaming.py", "PARTIAL_FORMAT"): "layerwise.partial",
    ("eval/results.py", "FORMAT"): "layerwise.eval",
    ("eval/comparison.py", "REPORT_FORMAT"): "layerwise.report",
    ("compress/output/export_compressed_tensors.py", "FORMAT"): "pack-quantized",
    ("compress/transform/config.py", "ROTATION_FORMAT"): "layerwise.rotation",
}


def _constant(path: Path, name: str) -> object:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} no longer defines {name}")


@pytest.mark.parametrize(("where", "released"), list(RELEASED.items()), ids=[f"{p}:{n}" for p, n in RELEASED])
def test_format_constant_keeps_its_released_name(where, released):
    path, name = where
    assert _constant(ROOT / path, name) == released


def test_no_format_string_names_a_module_path():
    """A format string that spells a module path (layerwise.output.*) is the accident above."""
    modules = {p.name for p in (ROOT / "compress").iterdir() if p.is_dir()}
    offenders = []
    for path in list((ROOT / "compress").rglob("*.py")) + list((ROOT / "eval").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (isinstance(key, ast.Constant) and key.value == "format" and isinstance(value, ast.Constant)
                            and isinstance(value.value, str) and value.value.count(".") > 1
                            and value.value.split(".")[1] in modules):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {value.value}")
    assert not offenders, offenders
