"""The model table for the command line, training and checkpoints, read from the specs.

Each model family registers a :class:`fastar.models.spec.ModelSpec` beside its class
(:data:`fastar.models.SPECS`); this module only looks names up in that table, so a new
family needs no edit here. A model is named by its spec's key or its class name (case, ``-``
and ``_`` are ignored, so ``MyModel``, ``my-model`` and ``my_model`` name one spec) and built from a plain dict of constructor keyword
arguments, its *config*, which checkpoints store so a model can be rebuilt without the code
that trained it.

The data sets are a table of their own, :mod:`fastar.data.sets`; ``load_dataset``,
``Dataset`` and ``DATASETS`` are re-exported here for older callers.
"""
from __future__ import annotations

import torch

from fastar.data.sets import DATASETS, Dataset, load_dataset, load_like

__all__ = ["specs", "spec", "canonical_model", "model_class", "model_kind", "build_model", "default_config",
           "conditional_config", "is_conditional", "models_for", "default_model", "shipped_checkpoints",
           "check_compatible", "load_dataset", "load_like", "Dataset", "DATASETS"]


def specs() -> dict:
    """name -> ModelSpec, in registration order (importing :mod:`fastar.models` registers them)."""
    from fastar.models import SPECS

    return SPECS


def _norm(name) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def canonical_model(name: str) -> str:
    """'MyModel' / 'my-model' -> 'my_model' (the spec key); ValueError for an unknown model."""
    table = specs()
    for k, s in table.items():
        if _norm(name) in (_norm(k), _norm(s.cls.__name__)):
            return k
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(table)}")


def spec(name: str):
    """The registered :class:`~fastar.models.spec.ModelSpec` of a model name."""
    return specs()[canonical_model(name)]


def model_class(name: str):
    return spec(name).cls


def model_kind(name: str) -> str:
    return spec(name).kind


def build_model(name: str, config: dict) -> torch.nn.Module:
    """Instantiate a registered model from its config dict (constructor keyword arguments)."""
    try:
        return model_class(name)(**config)
    except TypeError as e:
        raise ValueError(f"cannot build {canonical_model(name)} from config {config}: {e}") from None


def _info(data) -> dict:
    return data.info() if isinstance(data, Dataset) else dict(data)


def models_for(data) -> list[str]:
    """The registered models that can train on a data set (a name, a Dataset or its info)."""
    if isinstance(data, str):
        name, kind = data, DATASETS[data].kind
    else:
        info = _info(data)
        name, kind = info["name"], info["kind"]
    return [k for k, s in specs().items() if s.kind == kind and name in s.datasets] or \
        [k for k, s in specs().items() if s.kind == kind]


def check_compatible(name: str, data) -> None:
    """ValueError, naming the models that fit, when model `name` cannot train on `data`."""
    s, info = spec(name), _info(data)
    if s.kind != info["kind"]:
        raise ValueError(f"model {s.name!r} takes {s.kind} data, but data set {info['name']!r} is {info['kind']}; "
                         f"use {' or '.join(models_for(info))} with --data {info['name']}")
    if info["name"] in DATASETS and info["name"] not in s.datasets:
        raise ValueError(f"model {s.name!r} trains on {', '.join(s.datasets)}, not {info['name']!r}; "
                         f"use {' or '.join(models_for(info))} with --data {info['name']}")


def default_config(name: str, data) -> dict:
    """A small default config of model `name` for data set `data` (a Dataset or its info)."""
    check_compatible(name, data)
    return dict(spec(name).default_config(_info(data)))


def conditional_config(name: str, data) -> dict | None:
    """The config overrides that make model `name` class-conditional on `data`, or None if it cannot be."""
    return spec(name).conditional_config(_info(data))


def is_conditional(name: str, config: dict, data) -> bool:
    """Whether a model built from `config` is the class-conditional variant for `data`."""
    over = conditional_config(name, data)
    return bool(over) and all(config.get(k) == v for k, v in over.items())


def shipped_checkpoints() -> list[str]:
    """Every shipped checkpoint name the specs declare, in registration order."""
    return [c for s in specs().values() for c in s.shipped]


def default_model(kind: str = "image") -> str:
    """The demo's model: the first registered spec of `kind` that ships a checkpoint (else the first of `kind`)."""
    of_kind = [s for s in specs().values() if s.kind == kind]
    if not of_kind:
        raise ValueError(f"no registered model takes {kind} data")
    return next((s.name for s in of_kind if s.shipped), of_kind[0].name)
