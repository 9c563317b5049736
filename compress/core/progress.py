"""Progress a user can read: phases announced by name and timed, and per-item bars.

On a terminal, bars are tqdm's. When stderr is not a terminal (a log file, a CI job, `nohup`), tqdm's
carriage-return redraws pile up into one unreadable line, so a bar then prints plain lines instead: its
name, the count done of the total and the elapsed time, at most every `LINE_INTERVAL_S` seconds and at
the end. Either way a slow phase is never silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LINE_INTERVAL_S = 10.0


def _interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable: Iterable[T], *, desc: str, total: int | None = None, initial: int = 0, unit: str = "it",
        disable: bool = False) -> Iterator[T]:
    """`iterable` with progress: a tqdm bar on a terminal, dated plain lines elsewhere."""
    if disable:
        yield from iterable
        return
    if _interactive():
        yield from tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit)
        return
    total = total if total is not None else _length(iterable)
    start = last = time.perf_counter()
    done = initial
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= LINE_INTERVAL_S or done == total:
            last = now
            of = f"/{total}" if total is not None else ""
            print(f"{desc}: {done}{of} {plural(unit)} ({now - start:.0f} s)", file=sys.stderr, flush=True)


def plural(unit: str) -> str:
    """``batch`` -> ``batches``, ``layer`` -> ``layers``: units are English nouns."""
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x", "z")) else "s")


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class PhaseClock:
    """Announces each phase of a run by name (on stderr, when `announce`) and times each one on its own."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        if self.announce:
            print(f"layerwise: {name}{f' ({detail})' if detail else ''}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
