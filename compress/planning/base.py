"""What every planner is: the `Planner` base class, the `PLANNERS` registry, and the checks on both.

A planner declares, as class attributes read without running it, its `name`, its `Config` (a frozen
dataclass that validates itself in ``__post_init__``) and what it `requires` of the scores: names from
the scorers' `LayerScorer.provides` (``"option_damage"`` for `optimal`). `plan(scores, config)` does
the planning. The built-in planners register themselves in `layerwise.planning.planners` (lwq) and
`layerwise.planning.optimal`; import the registry from `layerwise.planning.planners`, which imports both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any, ClassVar

from layerwise.core.errors import LayerwiseError
from layerwise.core.registry import Registry
from layerwise.core.types import LayerScores, Plan, QuantSpec, parse_options

# How the planner messages name what a scorer provides (LayerScorer.provides).
_PROVIDED = {
    "scores": "a score per layer",
    "option_damage": "measured damage per option",
    "module_damage": "measured damage per module and option",
    "block_distance": "distances between layers",
    "tie_damage": "measured damage of tying layers",
    "module_scores": "scores per module",
}


class Planner(ABC):
    """Turns layer scores and a budget into a `Plan`.

    `Config` holds every setting (budget included) and is what `make_plan` and ``layerwise plan`` build
    from the arguments they are given (`planner_config`). A Config with `options` but no `method` also
    accepts `method`: the default method of the options that name none.
    """

    name: ClassVar[str]
    Config: ClassVar[type[Any]]
    requires: ClassVar[frozenset[str]] = frozenset()  # what the scores must carry (LayerScorer.provides)

    @abstractmethod
    def plan(self, scores: LayerScores, config: Any) -> Plan:
        """The plan for `scores` under `config` (an instance of `Config`)."""

    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The argument names this planner takes: its Config's fields (and `method` with `options`)."""
        names = tuple(f.name for f in fields(cls.Config))
        if "options" in names and "method" not in names:
            names += ("method",)
        return names


PLANNERS: Registry[type[Planner]] = Registry("planner")


def check_planner_takes(planner_cls: type[Planner], names: list[str]) -> None:
    """Refuse, in one line, arguments (by name) that the planner does not take."""
    takes = planner_cls.arguments()
    unknown = [name for name in names if name not in takes]
    if unknown:
        raise LayerwiseError(
            f"planner {planner_cls.name!r} does not take {', '.join(unknown)} (it takes: {', '.join(takes)})"
        )


def planner_config(planner_cls: type[Planner], **given: Any) -> Any:
    """`planner_cls.Config` built from the arguments given, refusing the ones the planner does not take.

    Leave out what was not given: the Config's defaults apply. `options` may be text
    (``"2:128,4:128"``), a list of option strings, or QuantSpecs; text gets `method` (default ``rtn``)
    as the method of options that name none.
    """
    check_planner_takes(planner_cls, list(given))
    names = {f.name for f in fields(planner_cls.Config)}
    values = {name: value for name, value in given.items() if name in names}
    options = values.get("options")
    if options is not None and options and all(isinstance(o, QuantSpec) for o in options):
        values["options"] = tuple(options)
    elif options is not None:
        values["options"] = tuple(parse_options(options, default_method=given.get("method") or "rtn"))
    return planner_cls.Config(**values)


def check_planner_accepts(planner_cls: type[Planner], scorer_cls: Any) -> None:
    """Refuse, in one line, a scorer whose scores lack what the planner requires.

    `scorer_cls` is a `LayerScorer` class (anything with `name` and `provides`); the message names the
    registered scorers that would do.
    """
    missing = planner_cls.requires - scorer_cls.provides
    if not missing:
        return
    from layerwise.importance import SCORERS

    enough = [n for n in SCORERS.names() if planner_cls.requires <= SCORERS.get(n).provides]
    needs = " and ".join(_PROVIDED.get(m, m) for m in sorted(missing))
    use = f" (use --scorer {' or '.join(enough)})" if enough else ""
    raise LayerwiseError(
        f"planner {planner_cls.name!r} needs {needs}; scorer {scorer_cls.name!r} gives none{use}"
    )
