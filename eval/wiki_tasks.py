"""The offline lm-eval tasks: data built from the evaluation half of the built-in Wikipedia corpus.

Nothing here reads a hub. The task definitions are lm-eval YAML files shipped in ``layerwise/eval/tasks/``
as templates; on first use they are rendered, with the data files they read, into
``cache_dir()/tasks/wiki-v{WIKI_TASKS_VERSION}/``, which is what `TaskManager(include_path=...)` indexes.
That directory also runs with stock lm-eval: ``lm-eval run --include_path DIR --tasks wiki_mc ...``.

Source: the 24 evaluation articles of ``layerwise.data.corpora``'s ``wikipedia`` corpus (gensim's shortened
enwiki dump, cleaned; article i of the dump goes to evaluation iff i % 4 == 0). The calibration half,
which compression reads, is never used here.

``wiki_mc`` (multiple choice, metric ``acc``; ``acc_norm`` divides each choice's log-likelihood by
its length in bytes): every paragraph (a line of the cleaned article) is split into sentences. Each
sentence at position j >= 1 of its paragraph that is 40 to 160 characters long and ends in . ! or ? is
a candidate item. The context is the article's title, a blank line, and the sentence before it (at
most 300 characters). The 4 choices are the true sentence and 3 sentences drawn at random from the
*other* evaluation articles, of the same kind (40 to 160 characters, ending in . ! or ?) and within
20 % of the true one's length, so neither length nor form gives the answer away; the choices are then
shuffled. `WIKI_MC_ITEMS` candidates are drawn with ``random.Random(WIKI_TASKS_SEED)``. A model that
ignores the context scores about 25 % (chance); one that reads it recognises the sentence that goes on
with the topic and the sentence before it.

``wiki_ppl`` (``loglikelihood_rolling``, metrics ``word_perplexity``, ``byte_perplexity``,
``bits_per_byte``, lm-eval's WikiText protocol): the first `WIKI_PPL_ARTICLES` evaluation articles,
each as its title, a blank line and its text. lm-eval scores each article in rolling windows of the
model's maximum length, so the number differs from layerwise's own ``ppl`` protocol (token perplexity
in fixed 1,024-token windows), though the text overlaps.

The directory holds ``manifest.json``: the SHA-256 of each data file and of the dump it was built from,
and the build constants. Another dump (a new gensim release) or other constants rebuild the directory;
a change to how items are built bumps `WIKI_TASKS_VERSION`, which names the directory. A data file
that is missing or fails its checksum is an error naming the file and the fix, since a silently
rebuilt or edited file would change the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from layerwise.core.cache import cache_dir
from layerwise.core.errors import LayerwiseError

WIKI_TASKS_VERSION = 1
WIKI_TASKS_SEED = 1234
WIKI_MC_ITEMS = 200
WIKI_MC_CHOICES = 4
WIKI_MC_MIN_CHARS = 40
WIKI_MC_MAX_CHARS = 160
WIKI_MC_CONTEXT_SENTENCES = 1
WIKI_MC_CONTEXT_MAX_CHARS = 300
WIKI_MC_LENGTH_TOLERANCE = 0.2
WIKI_PPL_ARTICLES = 8

OFFLINE_TASKS = ("wiki_mc", "wiki_ppl")
MANIFEST = "manifest.json"
DATA_PLACEHOLDER = "@DATA_DIR@"

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket), then white space,
# then something that can start a sentence. An abbreviation or an initial before the dot is no end.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’')\]]?\s+(?=[\"“(\[]?[A-Z0-9])")
# Items and distractors are whole sentences: list items and captions without an end mark would stand out.
_ENDS = re.compile(r"[.!?][\"”’')\]]?$")
_ABBREVIATION = re.compile(
    r"(\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Capt|Sgt|Rev|Mt|vs|etc|e\.g|i\.e|c|ca|cf|No|Vol|pp|Fig|"
    r"U\.S|U\.K|Inc|Ltd|Co)|\b[A-Z])\.$"
)


TASK_FILES = {"wiki_mc": "wiki_mc.jsonl", "wiki_ppl": "wiki_ppl.jsonl"}


def sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph, in order (a heuristic splitter, good enough for encyclopaedic prose)."""
    out: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        piece = paragraph[start : match.start()].rstrip()
        if _ABBREVIATION.search(piece):
            continue
        out.append(paragraph[start : match.end()].strip())
        start = match.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def evaluation_articles() -> list[tuple[str, str]]:
    """(title, text) of each evaluation article, in corpus order."""
    from layerwise.data.corpora import wikipedia_split

    data = wikipedia_split()
    # Documents are "title\n\ntext" joined by "\n\n", and cleaned text never holds a blank line.
    parts = data["evaluation"].split("\n\n")
    titles, texts = parts[0::2], parts[1::2]
    if titles != data["evaluation_titles"] or len(texts) != len(titles):
        raise LayerwiseError("the cached wikipedia corpus does not split into its evaluation articles; "
                             f"remove {cache_dir() / 'corpora'} and layerwise rebuilds it")
    return list(zip(titles, texts, strict=True))


def build_wiki_mc(articles: list[tuple[str, str]], n_items: int = WIKI_MC_ITEMS,
                  seed: int = WIKI_TASKS_SEED) -> list[dict[str, Any]]:
    """The multiple-choice items (see the module docstring): context, 4 choices, index of the true one."""
    candidates: list[tuple[int, str, str]] = []  # (article, context, true sentence)
    pool: list[tuple[int, str]] = []  # (article, sentence): every sentence of admissible length
    for a, (_, text) in enumerate(articles):
        for paragraph in text.split("\n"):
            sents = sentences(paragraph)
            for j, sentence in enumerate(sents):
                if not WIKI_MC_MIN_CHARS <= len(sentence) <= WIKI_MC_MAX_CHARS or not _ENDS.search(sentence):
                    continue
                pool.append((a, sentence))
                context = " ".join(sents[max(0, j - WIKI_MC_CONTEXT_SENTENCES) : j])
                if j >= 1 and len(context) <= WIKI_MC_CONTEXT_MAX_CHARS:
                    candidates.append((a, context, sentence))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    items = []
    for a, context, true in candidates:
        if len(items) == n_items:
            break
        tolerance = WIKI_MC_LENGTH_TOLERANCE * len(true)
        similar = sorted({s for b, s in pool if b != a and abs(len(s) - len(true)) <= tolerance})
        if len(similar) < WIKI_MC_CHOICES - 1:
            continue
        choices = [true, *rng.sample(similar, WIKI_MC_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"id": len(items), "title": articles[a][0], "context": f"{articles[a][0]}\n\n{context}",
                      "choices": choices, "gold": choices.index(true)})
    if len(items) < n_items:
        raise LayerwiseError(f"the evaluation articles give only {len(items)} wiki_mc items, not {n_items}")
    return items


def build_wiki_ppl(articles: list[tuple[str, str]], n_articles: int = WIKI_PPL_ARTICLES) -> list[dict[str, Any]]:
    """The first `n_articles` articles, each as its title, a blank line and its text."""
    chosen = articles[:n_articles]
    return [{"id": i, "title": title, "text": f"{title}\n\n{text}"} for i, (title, text) in enumerate(chosen)]


# ------------------------------------------------------------------------------------------ the directory


def build_params() -> dict[str, Any]:
    """The constants the data is built with; a directory built with others is rebuilt."""
    return {"version": WIKI_TASKS_VERSION, "seed": WIKI_TASKS_SEED, "mc_items": WIKI_MC_ITEMS,
            "mc_choices": WIKI_MC_CHOICES, "mc_min_chars": WIKI_MC_MIN_CHARS, "mc_max_chars": WIKI_MC_MAX_CHARS,
            "mc_context_sentences": WIKI_MC_CONTEXT_SENTENCES, "mc_context_max_chars": WIKI_MC_CONTEXT_MAX_CHARS,
            "mc_length_tolerance": WIKI_MC_LENGTH_TOLERANCE, "ppl_articles": WIKI_PPL_ARTICLES}


def task_dir() -> Path:
    """Where the rendered tasks live (it may not exist yet)."""
    return cache_dir() / "tasks" / f"wiki-v{WIKI_TASKS_VERSION}"


def prepare_task_dir() -> Path:
    """The directory to pass to lm-eval's `include_path`: built on first use, checked on every use."""
    from layerwise.data.corpora import wikipedia_dump_path

    target = task_dir()
    dump_sha = _sha256(wikipedia_dump_path().read_bytes())
    manifest = _read_manifest(target)
    if manifest is None or manifest.get("dump_sha256") != dump_sha or manifest.get("params") != build_params():
        _build(target, dump_sha)
        manifest = _read_manifest(target)
        assert manifest is not None
    _check_files(target, manifest)
    _render_yamls(target)
    return target


def _build(target: Path, dump_sha: str) -> None:
    print(f"layerwise: building the offline tasks {', '.join(OFFLINE_TASKS)} in {target} (once)", file=sys.stderr)
    articles = evaluation_articles()
    rows = {"wiki_mc": build_wiki_mc(articles), "wiki_ppl": build_wiki_ppl(articles)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for task, file in TASK_FILES.items():
            data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows[task])
            (tmp / file).write_text(data, encoding="utf-8")
            files[file] = {"sha256": _sha256(data.encode("utf-8")), "rows": len(rows[task])}
        manifest = {
            "format": "layerwise.tasks",
            "version": WIKI_TASKS_VERSION,
            "seed": WIKI_TASKS_SEED,
            "source": "layerwise.data.corpora wikipedia corpus, evaluation split",
            "dump_sha256": dump_sha,
            "params": build_params(),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # built from another dump: replace the whole directory
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_manifest(target: Path) -> dict[str, Any] | None:
    path = target / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayerwiseError(f"task manifest {path} is not valid JSON ({exc}); remove {target} and layerwise "
                             "rebuilds it on next use") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise LayerwiseError(f"task manifest {path} is malformed (no 'files'); remove {target} and layerwise "
                             "rebuilds it on next use")
    return manifest


def _check_files(target: Path, manifest: dict[str, Any]) -> None:
    """Each data file is there, parses line by line, and has the checksum it was built with."""
    for file in TASK_FILES.values():
        path = target / file
        fix = f"remove {target} and layerwise rebuilds it on next use"
        if not path.is_file():
            raise LayerwiseError(f"task data file {path} is missing; {fix}")
        raw = path.read_bytes()
        for number, line in enumerate(raw.splitlines(), start=1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise LayerwiseError(f"task data file {path} is malformed: line {number} is not JSON ({exc}); "
                                     f"{fix}") from None
            if not isinstance(row, dict):
                raise LayerwiseError(f"task data file {path} is malformed: line {number} is not an object; {fix}")
        expected = manifest["files"].get(file, {}).get("sha256")
        if _sha256(raw) != expected:
            raise LayerwiseError(f"task data file {path} is malformed: its SHA-256 differs from {target / MANIFEST} "
                                 f"(edited or damaged); {fix}")


def _render_yamls(target: Path) -> None:
    for task in OFFLINE_TASKS:
        text = template(task).replace(DATA_PLACEHOLDER, target.as_posix())
        path = target / f"{task}.yaml"
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)


def template(task: str) -> str:
    """The packaged YAML template of an offline task."""
    resource = resources.files("layerwise.eval").joinpath("tasks", f"{task}.yaml")
    if not resource.is_file():
        raise LayerwiseError(f"the task definition tasks/{task}.yaml is missing from the layerwise package; "
                             "reinstall layerwise (pip install --force-reinstall layerwise)")
    return resource.read_text(encoding="utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
