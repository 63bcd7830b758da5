"""Selection by name: the one lookup every registry of the project goes through. Pure, no imports.

A registry is a dict name -> implementation (`prefix_store.scoring.SCORERS`,
`learner.objectives.KL_ESTIMATORS`, `learner.schedule.LR_SCHEDULES`, ...) or,
where the name only switches a branch in its owner, a tuple of names
(`prefix_store.tree.BRANCH_ACTIONS`). Its owner defines it; launch/config.py
reads its names to validate the config, so the allowed values are written once.
Adding an implementation means adding an entry to its owner's dict.
"""
from __future__ import annotations

from typing import Collection, Mapping, TypeVar

T = TypeVar("T")


def check(kind: str, names: Collection[str], name: str) -> str:
    """`name` if it is one of `names`, else ValueError: "unknown <kind> 'x'; choose one of a, b, c"."""
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(names)}")
    return name


def lookup(kind: str, registry: Mapping[str, T], name: str) -> T:
    """registry[name]; an unknown name raises the ValueError of `check`, which lists the valid ones."""
    return registry[check(kind, registry, name)]
