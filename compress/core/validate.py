"""Numeric arguments, checked once by name for the API and the command line.

Each argument has one `Rule`: whole number or real, the smallest value allowed, or the values allowed.
`check_numbers(bits=..., calib_windows=...)` raises a one-line `LayerwiseError` for the first bad value
(the API calls it at the top of each public function, before any work); `parse_number(name, text)` reads
a command-line value by the same rule (the CLI wraps it as an argparse ``type=``). NaN and infinities are
never accepted, and `bool` is not a number here (``bits=True`` is a mistake, not 1 bit).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import SUPPORTED_BITS


@dataclass(frozen=True)
class Rule:
    """`integer` (whole numbers only) or real; at least `minimum` (above it when `exclusive`), or one of
    `allowed`; `example` is a good value, shown in the fix."""

    integer: bool
    minimum: float | None = None
    exclusive: bool = False
    allowed: tuple[int, ...] | None = None
    example: str = ""

    def problem(self, value: object) -> str | None:
        """Why `value` breaks the rule (``"must be ..., got ..."``), or None when it is fine."""
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        finite = number and math.isfinite(value)  # type: ignore[arg-type]
        ok = finite and (isinstance(value, numbers.Integral) or not self.integer)
        if ok and self.allowed is not None:
            ok = value in self.allowed
        elif ok and self.minimum is not None:
            ok = value > self.minimum if self.exclusive else value >= self.minimum  # type: ignore[operator]
        return None if ok else f"must be {self.describe()}, got {value!r}"

    def describe(self) -> str:
        if self.allowed is not None:
            return f"one of {', '.join(map(str, self.allowed))}"
        kind = "a whole number" if self.integer else "a finite number"
        if self.minimum is None:
            return kind
        bound = int(self.minimum) if self.integer else self.minimum
        return f"{kind} {'above' if self.exclusive else 'of at least'} {bound}"


_WIDTH = Rule(integer=True, allowed=SUPPORTED_BITS, example="4")
_COUNT = Rule(integer=True, minimum=0, example="2")
_POSITIVE = Rule(integer=True, minimum=1, example="8")
_TOKENS = Rule(integer=True, minimum=2, example="512")

RULES: dict[str, Rule] = {
    "bits": Rule(integer=False, minimum=0, exclusive=True, example="3.25"),
    "uniform": _WIDTH,
    "high": _WIDTH,
    "low": Rule(integer=True, allowed=SUPPORTED_BITS, example="2"),
    "n_low": _COUNT,
    "group_size": Rule(integer=True, minimum=1, example="128"),
    "seed": Rule(integer=True, minimum=0, example="0"),
    "rotate_seed": Rule(integer=True, minimum=0, example="0"),
    "calib_windows": Rule(integer=True, minimum=1, example="64"),
    "calib_len": _TOKENS,
    "prune": _COUNT,
    "drop_attn": _COUNT,
    "drop_mlp": _COUNT,
    "tie": _COUNT,
    "batch_size": _POSITIVE,
    "limit": Rule(integer=False, minimum=0, exclusive=True, example="50"),
    "num_fewshot": Rule(integer=True, minimum=0, example="0"),
    "max_tokens": Rule(integer=True, minimum=2, example="16384"),
    "window": Rule(integer=True, minimum=2, example="1024"),
}


def check_numbers(**values: object) -> None:
    """Raise a LayerwiseError naming the first argument (by its `RULES` name) that breaks its rule.

    None means "not given" and is skipped; the callers' own defaults all pass.
    """
    for name, value in values.items():
        if value is None:
            continue
        rule = RULES[name]
        problem = rule.problem(value)
        if problem is not None:
            raise LayerwiseError(f"{name} {problem}; pass e.g. {name}={rule.example}")


def parse_number(name: str, text: str) -> int | float:
    """A command-line value for argument `name`, read and checked by its rule; the message (for argparse,
    which prefixes the flag) says what is allowed and gives an example."""
    rule = RULES[name]
    value: int | float
    try:
        value = int(text) if rule.integer else float(text)
    except ValueError:
        value = math.nan
    problem = rule.problem(value)
    if problem is not None:
        raise LayerwiseError(f"must be {rule.describe()}, got {text!r}; e.g. --{_flag(name)} {rule.example}")
    return value


def _flag(name: str) -> str:
    return name.replace("_", "-")
