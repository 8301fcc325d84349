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

import inspect
import threading

import torch

from fastar.data.sets import DATASETS, Dataset, load_dataset, load_like

__all__ = ["specs", "spec", "canonical_model", "model_class", "model_kind", "build_model", "default_config",
           "conditional_config", "is_conditional", "models_for", "default_model", "shipped_checkpoints",
           "check_compatible", "validate_config", "MAX_PARAMETERS", "load_dataset", "load_like", "Dataset", "DATASETS"]


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


# Sane bounds on a config, checked before anything is built. A config comes from --model-arg or from
# a checkpoint file, which anyone can craft, and it becomes constructor arguments verbatim.
MAX_PARAMETERS = 10**9   # no model this library trains comes near; 4 GB of float32 weights
MAX_MODULES = 20_000     # a deep stack is slow to build even on the meta device (~ms a module)
MAX_INT = 1 << 16        # no integer hyper-parameter (layers, channels, levels, height) is sanely larger

_SCALARS = (bool, int, float, str, type(None))


class _TooBig(Exception):
    pass


def _annotation_allows_none(p: inspect.Parameter) -> bool:
    ann = p.annotation
    return p.default is None or (isinstance(ann, str) and "None" in ann)


def _expected_type(p: inspect.Parameter):
    """int, float, str or bool from the default's type (else from a string annotation like 'int | None');
    None when nothing says (any plain value is then accepted)."""
    if isinstance(p.default, bool):
        return bool
    if isinstance(p.default, (int, float, str)):
        return type(p.default)
    ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
    parts = {a.strip() for a in str(ann).split("|")} - {"None", ""}
    if len(parts) == 1:
        return {"int": int, "float": float, "str": str, "bool": bool}.get(parts.pop())
    return None


def _plain(v, depth=0) -> bool:
    if isinstance(v, _SCALARS):
        return True
    return isinstance(v, (list, tuple)) and depth < 2 and len(v) <= 64 and all(_plain(x, depth + 1) for x in v)


def _ints_in(v):
    if isinstance(v, bool):
        return
    if isinstance(v, int):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _ints_in(x)


def validate_config(name: str, config) -> dict:
    """ValueError unless `config` is a dict of constructor keyword arguments of model `name` (by the
    class's signature: unknown keys are named), each of the type its default or annotation says
    (an int where an int is expected; a float slot accepts an int), plain values only, and no
    integer outside [0, MAX_INT]. Returns the config. The parameter-count bound is checked by
    :func:`build_model`, which builds on the meta device first."""
    key = canonical_model(name)
    if not isinstance(config, dict):
        raise ValueError(f"the config of {key} must be a dict of constructor arguments, got {type(config).__name__}")
    params = {k: p for k, p in inspect.signature(spec(key).cls).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in config if k not in params]
    if unknown:
        raise ValueError(f"{key} has no constructor argument {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(params)}")
    for k, v in config.items():
        p = params[k]
        if not _plain(v):
            raise ValueError(f"{key} config {k}={v!r}: only numbers, strings, booleans, None and short lists")
        if v is None:
            if not _annotation_allows_none(p):
                raise ValueError(f"{key} config {k}=None: {k} needs a value (default {p.default!r})")
            continue
        want = _expected_type(p)
        ok = (want is None or (want is float and isinstance(v, (int, float)) and not isinstance(v, bool))
              or (want is int and isinstance(v, int) and not isinstance(v, bool)) or (want in (str, bool)
              and isinstance(v, want)))
        if not ok:
            raise ValueError(f"{key} config {k}={v!r}: expected {want.__name__}, got {type(v).__name__}")
        for i in _ints_in(v):
            if not 0 <= i <= MAX_INT:
                raise ValueError(f"{key} config {k}={v!r}: integers must lie in [0, {MAX_INT}]")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in config]
    if missing:
        raise ValueError(f"{key} config lacks the required argument(s) {', '.join(missing)}")
    return config


def _check_size(key: str, cls, config: dict) -> None:
    """Build on the meta device (no memory, no random numbers drawn) and refuse a model of more than
    MAX_PARAMETERS parameters or MAX_MODULES modules; global registration hooks stop the build as soon
    as a bound is crossed, so an absurd config costs no more than a sane one."""
    me, count = threading.get_ident(), {"params": 0, "modules": 0}

    def on_param(module, pname, param):
        if threading.get_ident() == me and param is not None:
            count["params"] += param.numel()
            if count["params"] > MAX_PARAMETERS:
                raise _TooBig(f"more than {MAX_PARAMETERS:,} parameters")

    def on_module(module, mname, sub):
        if threading.get_ident() == me:
            count["modules"] += 1
            if count["modules"] > MAX_MODULES:
                raise _TooBig(f"more than {MAX_MODULES:,} modules")

    from torch.nn.modules import module as M

    hooks = (M.register_module_parameter_registration_hook(on_param),
             M.register_module_module_registration_hook(on_module))
    try:
        with torch.device("meta"):
            cls(**config)
    except _TooBig as e:
        raise ValueError(f"refusing to build {key} from config {config}: {e}") from None
    except Exception:
        # A constructor the meta device cannot run (or a config it rejects): the real build below says
        # what is wrong, and the per-value bounds of validate_config still hold.
        pass
    finally:
        for h in hooks:
            h.remove()


def build_model(name: str, config: dict) -> torch.nn.Module:
    """Instantiate a registered model from its config dict (constructor keyword arguments), after
    :func:`validate_config` and a size check on the meta device (ValueError for either)."""
    key = canonical_model(name)
    validate_config(key, config)
    cls = model_class(key)
    _check_size(key, cls, config)
    try:
        return cls(**config)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ValueError(f"cannot build {key} from config {config}: {' '.join(str(e).split())}") from None


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
    """The demo's model: of the registered specs of `kind` that ship a checkpoint, the one of the highest
    ``demo_priority`` (the first registered among equals); else the first of `kind`."""
    of_kind = [s for s in specs().values() if s.kind == kind]
    if not of_kind:
        raise ValueError(f"no registered model takes {kind} data")
    shipping = [s for s in of_kind if s.shipped]
    if not shipping:
        return of_kind[0].name
    return max(shipping, key=lambda s: s.demo_priority).name  # max keeps the first of equal priority
