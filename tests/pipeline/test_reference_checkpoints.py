"""For the same arguments, the checkpoint bytes and the plan (its predicted damage within a tolerance) are the
ones recorded in tests/data/reference_checkpoints.json (made by tests/reference_cases.py; its docstring says
when and why they were rewritten)."""

from __future__ import annotations

import json

import pytest
import torch
from reference_cases import CASES, REFERENCE_FILE, matches, run_case

REFERENCE = json.loads(REFERENCE_FILE.read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(REFERENCE["torch_threads"])  # GPTQ's float sums depend on the thread count
    yield tmp_path_factory.mktemp("reference")
    torch.set_num_threads(threads)


def test_every_case_has_a_reference():
    assert set(CASES) == set(REFERENCE["cases"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_bytes_match_the_reference(root, case):
    found, expected = run_case(case, root), REFERENCE["cases"][case]
    assert set(found) == set(expected)
    assert [key for key in found if not matches(key, expected[key], found[key])] == [], (found, expected)
