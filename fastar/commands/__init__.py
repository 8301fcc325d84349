"""The ``fastar`` commands, one module each: ``NAME``, ``add_parser(subparsers)`` and ``run(args)``.

:mod:`fastar.cli` builds its parser from :data:`COMMANDS` in this order. Every failure a user
can cause (unknown model or data set, a checkpoint of another model, a missing file, a
``--prefix`` image of the wrong size) raises ValueError or FileNotFoundError, which
:func:`fastar.cli.main` prints as one line with exit status 2.
"""
from fastar.commands import bench, demo, info, sample, train

COMMANDS = (info, bench, demo, train, sample)

__all__ = ["COMMANDS"]
