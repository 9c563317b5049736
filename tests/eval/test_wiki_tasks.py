"""The offline tasks' data: built deterministically from the evaluation split only, checked on every use."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from eval_helpers import use_private_cache

from layerwise.core.errors import LayerwiseError
from layerwise.data.corpora import load_text
from layerwise.eval import wiki_tasks
from layerwise.eval.wiki_tasks import (
    OFFLINE_TASKS,
    WIKI_MC_CHOICES,
    WIKI_MC_ITEMS,
    WIKI_MC_LENGTH_TOLERANCE,
    build_wiki_mc,
    build_wiki_ppl,
    evaluation_articles,
    prepare_task_dir,
    sentences,
)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    return use_private_cache(tmp_path / "cache", monkeypatch)


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def articles():
    return evaluation_articles()


def test_sentence_splitter():
    text = ('St. Louis lies on the Mississippi. Its population was 301,578 in 2020 (U.S. census). "It grew," '
            "said J. Smith. The end!")
    assert sentences(text) == ["St. Louis lies on the Mississippi.",
                               "Its population was 301,578 in 2020 (U.S. census).", '"It grew," said J. Smith.',
                               "The end!"]
    assert sentences("One line without an end") == ["One line without an end"]


def test_evaluation_articles_are_the_evaluation_split(articles):
    assert len(articles) == 24 and articles[0][0] == "Anarchism"
    evaluation, calibration = load_text("wikipedia", "evaluation"), load_text("wikipedia", "calibration")
    for title, text in articles:
        assert f"{title}\n\n{text}" in evaluation
        assert text[:500] not in calibration


def test_wiki_mc_items_are_deterministic_and_well_formed(articles):
    items = build_wiki_mc(articles)
    assert items == build_wiki_mc(articles)  # fixed seed
    assert len(items) == WIKI_MC_ITEMS
    text_of = dict(articles)
    golds = Counter()
    for item in items:
        choices, gold = item["choices"], item["gold"]
        assert len(choices) == len(set(choices)) == WIKI_MC_CHOICES
        golds[gold] += 1
        title = item["title"]
        assert item["context"].startswith(f"{title}\n\n")
        assert choices[gold] in text_of[title]
        true_len = len(choices[gold])
        for i, choice in enumerate(choices):
            if i != gold:
                assert choice not in text_of[title]  # drawn from another article
                assert abs(len(choice) - true_len) <= WIKI_MC_LENGTH_TOLERANCE * true_len
        # the context is the sentence just before the true one, in the same paragraph
        before = item["context"].split("\n\n", 1)[1]
        assert f"{before} {choices[gold]}" in text_of[title]
    assert all(golds[k] > 0.15 * len(items) for k in range(WIKI_MC_CHOICES)), golds  # shuffled positions
    assert len({item["title"] for item in items}) == len(articles)  # every article contributes


def test_other_seeds_give_other_items(articles):
    assert build_wiki_mc(articles, n_items=20, seed=1) != build_wiki_mc(articles, n_items=20, seed=2)


def test_wiki_ppl_documents(articles):
    docs = build_wiki_ppl(articles)
    assert [d["title"] for d in docs] == [t for t, _ in articles[: len(docs)]]
    assert all(d["text"].startswith(d["title"] + "\n\n") for d in docs)


def test_task_dir_is_built_once_and_rendered(private_cache):
    path = prepare_task_dir()
    assert path.is_relative_to(private_cache)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"]["wiki_mc.jsonl"]["rows"] == WIKI_MC_ITEMS
    for task in OFFLINE_TASKS:
        yaml_text = (path / f"{task}.yaml").read_text()
        assert f"task: {task}" in yaml_text and wiki_tasks.DATA_PLACEHOLDER not in yaml_text
        assert f"{path.as_posix()}/{task}.jsonl" in yaml_text
    stamp = (path / "wiki_mc.jsonl").stat().st_mtime_ns
    assert prepare_task_dir() == path and (path / "wiki_mc.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "wiki_mc.jsonl").unlink(), "wiki_mc.jsonl is missing"),
        (lambda p: (p / "wiki_mc.jsonl").write_text('{"context": "x"\n'), "line 1 is not JSON"),
        (lambda p: (p / "wiki_ppl.jsonl").write_text('{"text": "edited"}\n'), "SHA-256 differs"),
        (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    ],
)
def test_damaged_task_data_is_a_clear_error(private_cache, damage, message):
    path = prepare_task_dir()
    damage(path)
    with pytest.raises(LayerwiseError, match=message) as info:
        prepare_task_dir()
    assert f"remove {path}" in str(info.value)


def test_task_templates_ship_as_package_data():
    """A non-editable install carries the YAML templates: pyproject declares them as package data."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "layerwise.eval" in setuptools["packages"]
    source = ROOT / setuptools["package-dir"]["layerwise.eval"]
    patterns = setuptools["package-data"]["layerwise.eval"]
    shipped = {p.name for pattern in patterns for p in source.glob(pattern)}
    assert {f"{task}.yaml" for task in OFFLINE_TASKS} <= shipped
    for task in OFFLINE_TASKS:
        assert wiki_tasks.DATA_PLACEHOLDER in wiki_tasks.template(task)
