"""Model specs: what the command line, the training loop, the benchmarks and the contract tests
need to know about a model family, stated once beside the model class.

A family registers itself with one line in its own file::

    register(ModelSpec(name="pixelcnn", cls=PixelCNN, kind="image", datasets=("mnist", ...), ...))

and :mod:`fastar.models` imports that file. Nothing outside the family's own files names it:
:mod:`fastar.registry`, ``fastar train``, ``fastar sample``, ``fastar demo`` and ``fastar bench``
iterate over :data:`SPECS`.

The interface every registered model class offers (the generation protocol of
``docs/architecture.md``):

- ``nll(x, cond=None) -> (N,)`` nats per example; ``bits_per_dim(x, cond)`` = nll / (D ln 2);
  ``loss(x, cond)`` = mean nll;
- ``sample(n, shape=None, cond=None, generator=None, temperature=1.0, method="cached"|"naive",
  prefix=None, mask=None, progress=True)``: drawn through :mod:`fastar.sampling`;
- ``sequence(n, shape, cond)`` -> :class:`fastar.sampling.Sequence` (how many steps, the head,
  the naive full-forward baseline) and, optionally, ``allocate_inference_cache(run)`` -> a cache
  with ``step`` / ``update`` (see :class:`fastar.sampling.InferenceCache`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

__all__ = ["ModelSpec", "register", "SPECS"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registered model family.

    name: the registry key (``fastar train NAME``); cls: the ``nn.Module`` class;
    kind: the kind of data it models, a key of :data:`fastar.data.kinds.KINDS` (``"image"``: (N, C, H, W)
    integers; ``"audio"``: (N, T) mu-law codes; ``"vector"``: (N, D) real values; a family may
    register its own); datasets: the bundled data sets it trains on (the first is its
    default); default_config(data_info) -> a small CPU-friendly constructor config for a data set
    (``data_info``: :meth:`fastar.data.Dataset.info`); conditional_config(data_info) -> the config
    overrides that make it class-conditional on that data set, or None when it cannot be;
    writer: how samples are written, a key of :data:`fastar.commands.writers.WRITERS` (``"png"``: an
    image grid, ``"wav"``, ``"npy"``; a family may register its own with
    :func:`fastar.commands.writers.register_writer`); shipped: the
    names of checkpoints shipped in :mod:`fastar.checkpoints` (the first is the demo's);
    demo: the ``fastar train`` keyword arguments the demo uses when it must train one itself;
    tiny: a tiny config and sample shape for the contract tests (``{"config": {...}, "shape":
    ...}``; the shape small enough to enumerate every sequence of a binary or 3-level domain);
    demo_priority: ``fastar demo``'s default model is the shipping spec of the highest priority (the
    first registered among equals).
    """

    name: str
    cls: type
    kind: str
    datasets: tuple
    default_config: Callable[[dict], dict]
    writer: str
    conditional_config: Callable[[dict], dict | None] = lambda data: None
    shipped: tuple = ()
    demo: dict = dataclasses.field(default_factory=dict)
    tiny: tuple = ()
    description: str = ""
    demo_priority: int = 0

    def __post_init__(self):
        from fastar.data.kinds import KINDS

        if self.kind not in KINDS:
            raise ValueError(f"ModelSpec {self.name!r}: kind must be a registered kind of data ({', '.join(KINDS)}; "
                             f"fastar.data.kinds.register_kind adds one), got {self.kind!r}")
        # The writer table lives with the commands (a layer above the models): a writer name is checked
        # when a command looks it up (fastar.commands.writers.writer_of).
        if not isinstance(self.writer, str) or not self.writer:
            raise ValueError(f"ModelSpec {self.name!r}: writer must name a registered writer, got {self.writer!r}")


SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family to :data:`SPECS` (one call in the family's own file). Returns the spec."""
    if spec.name in SPECS and SPECS[spec.name].cls is not spec.cls:
        raise ValueError(f"model name {spec.name!r} is registered twice ({SPECS[spec.name].cls.__name__} and "
                         f"{spec.cls.__name__})")
    SPECS[spec.name] = spec
    return spec
