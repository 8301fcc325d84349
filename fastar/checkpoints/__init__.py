"""Small trained checkpoints shipped inside the package (see README.md in this folder).

The names come from the model specs (``ModelSpec.shipped``); the file of name N is ``N.pt``
here. ``shipped_path(name)`` -> that file, or None when it is not shipped (or not in this
install). ``fastar sample NAME`` and ``fastar demo`` accept these names where a checkpoint
path is expected.

Each carries the checksum of :mod:`fastar.checkpoint` (added to the files trained before checksums,
their weights and metadata unchanged), so a damaged copy is refused at load.
"""
from __future__ import annotations

import os

__all__ = ["SHIPPED", "shipped_path"]

HERE = os.path.dirname(os.path.abspath(__file__))


def _shipped() -> dict:
    from fastar.registry import shipped_checkpoints

    return {name: name + ".pt" for name in shipped_checkpoints()}


SHIPPED = _shipped()


def shipped_path(name: str) -> str | None:
    f = SHIPPED.get(name)
    if f is None:
        return None
    p = os.path.join(HERE, f)
    return p if os.path.exists(p) else None
