"""The ``fastar`` commands, one module each: ``NAME``, ``add_parser(subparsers)`` and ``run(args)``.

:mod:`fastar.cli` builds its parser from :data:`COMMANDS` in this order. Every failure a user
can cause (unknown model or data set, a checkpoint of another model, a missing file, a
``--prefix`` image of the wrong size, a damaged or crafted checkpoint, a file that cannot be
written) raises ValueError, FileNotFoundError or OSError, which :func:`fastar.cli.main` prints
as one line with exit status 2; out-of-range counts and seeds are refused by the argument types
of :mod:`fastar.commands.common` (argparse's one line, also exit status 2). Every such case is a
row of ``tests/commands/test_bad_input_cli.py``.
"""
from fastar.commands import bench, check, compress, decompress, demo, info, sample, score, train

COMMANDS = (info, check, bench, demo, train, sample, compress, decompress, score)

__all__ = ["COMMANDS"]
