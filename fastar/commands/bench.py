"""``fastar bench``: benchmark kernels against their references; saves JSON + markdown and a speed-up plot."""
from __future__ import annotations

import glob
import os
import time

from fastar.commands.common import positive_int

NAME = "bench"


def add_parser(sub) -> None:
    from fastar.bench import FAMILIES

    p = sub.add_parser(NAME, help="benchmark kernels against their references; saves JSON + markdown")
    p.add_argument("families", nargs="*", metavar="FAMILY",
                   help=f"op families to run (default: all): {', '.join(FAMILIES)}")
    p.add_argument("--out", default="benchmarks/results", help="folder for the results (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: every device available)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and cases, for a smoke run")
    p.add_argument("--no-plot", action="store_true", help="skip the speed-up plot (PNG beside the results)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastar import bench

    start = time.time()
    rc = bench.main(args.families, out_dir=args.out, quick=args.quick, device=args.device, threads=args.threads)
    if rc == 0 and not getattr(args, "no_plot", False):
        plot_new_results(args.out, start)
    return rc


def plot_new_results(out_dir: str, since: float) -> None:
    """A speed-up plot beside every result file this run wrote (none without matplotlib)."""
    try:
        from fastar.bench.plot import plot_results
    except ImportError:
        return
    for j in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        if os.path.getmtime(j) >= since - 1:
            try:
                png = plot_results(j)
            except ImportError:
                print("matplotlib is not installed: no speed-up plot (pip install matplotlib)")
                return
            if png:
                print(f"saved {png}")
