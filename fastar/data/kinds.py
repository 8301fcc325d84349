"""Kinds of data as a table that grows: what a model's spec, a data set and a checkpoint may say
their data is. A family or data set with a new kind of data adds one :class:`Kind` with
:func:`register_kind`; the specs, the checkpoint checks and the commands read this table.

Built in: ``image`` ((C, H, W) integer codes in [0, levels)), ``audio`` ((T,) integer codes, or
real values for a continuous head) and ``vector`` ((D,) real values: tables such as RNADE's).
"""
from __future__ import annotations

import dataclasses

__all__ = ["Kind", "KINDS", "register_kind", "kind"]


@dataclasses.dataclass(frozen=True)
class Kind:
    """name: the kind's key; rank: how many sizes one example's shape has ((C, H, W): 3);
    discrete: examples are integer codes in [0, levels) (a checkpoint then records levels >= 2);
    description: one line for help texts."""

    name: str
    rank: int
    discrete: bool = True
    description: str = ""


KINDS: dict[str, Kind] = {}


def register_kind(k: Kind) -> Kind:
    """Add a kind of data (idempotent for an equal entry; a different one under a taken name is an error)."""
    if not isinstance(k, Kind):
        raise TypeError(f"register_kind takes a fastar.data.kinds.Kind, got {type(k).__name__}")
    if k.name in KINDS and KINDS[k.name] != k:
        raise ValueError(f"kind of data {k.name!r} is registered twice, differently")
    KINDS[k.name] = k
    return k


def kind(name: str) -> Kind:
    """The registered kind of that name; ValueError naming the known kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"unknown kind of data {name!r}; registered kinds: {', '.join(KINDS)}")
    return KINDS[name]


register_kind(Kind("image", 3, True, "images (C, H, W) of integer codes in [0, levels)"))
register_kind(Kind("audio", 1, True, "audio clips (T,) of mu-law codes (or real values for a mixture head)"))
register_kind(Kind("vector", 1, False, "real-valued vectors (D,): tables"))
