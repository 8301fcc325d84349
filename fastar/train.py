"""One training loop for every registered model, with checkpoints, resume and DDP.

``train(model, data, epochs=..., batch_size=..., lr=..., out=..., ...)`` (the fields of
:class:`TrainConfig`) is what ``fastar train`` runs. :func:`run` reads top to bottom: open the
run folder (an existing checkpoint is resumed or refused), load the data set (a fixed split),
build the model from its config (seeded) and Adam, then per epoch: a DistributedSampler order
(seed + epoch, so the order depends only on the epoch), a tqdm bar showing loss, bits/dim and
samples/s, a held-out evaluation, and an atomic checkpoint ``OUT/last.pt`` (see
:mod:`fastar.checkpoint`), plus one line per epoch appended to ``OUT/train.log``.

One objective for every model: the mean NLL per example in nats, ``model.nll(x, cond).mean()``;
bits/dim is that over ``x[0].numel() * ln 2`` (C * H * W for images, T for audio).

Reproducible resume: the checkpoint holds the weights, the optimizer state, the epochs and
steps done, the RNG state and the per-step loss history, and the batch order is a function of
(seed, epoch) alone, so ``--resume`` after an interruption gives on CPU the same per-step
losses, bit for bit, as one uninterrupted run. A crash mid-epoch resumes from the last
complete epoch.

Divergence: a NaN or inf loss, or one over ``DIVERGED`` (1000) times the first step's, stops training
with :class:`TrainingDiverged`, naming the step;
nothing is written after it, so ``OUT/last.pt`` stays the last good checkpoint.

Distributed: under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1 in the environment) the
objective is wrapped in DistributedDataParallel (nccl on cuda, gloo on cpu; rank r uses
cuda:LOCAL_RANK), each rank reads its DistributedSampler shard with ``batch_size`` examples per
step (global batch N * batch_size), and rank 0 alone evaluates, logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Callable

import torch
from torch import nn

from fastar import checkpoint as ckpt_mod
from fastar import registry

__all__ = ["train", "run", "TrainConfig", "TrainingDiverged", "evaluate", "check_device"]

LN2 = math.log(2.0)


# A loss this many times the first step's (a model at initialisation is about uniform, so no sane run
# climbs that far above it; a learning rate of 1e10 reaches 1e32 nats) is divergence too.
DIVERGED = 1000.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf, or over DIVERGED times the first step's; the message names the step
    and the checkpoint kept."""


@dataclasses.dataclass
class TrainConfig:
    """What one training run needs. model: a registry name (None: the registry's default model);
    data: a data set name (None: the model's first); batch_size: examples per process per step;
    config: overrides of the model's default config; conditional: feed the class labels as
    ``cond`` (the model's spec says whether it can be); limit / eval_limit: use only the first
    examples of each split (smoke runs); segment: audio training segment length; log: where
    rank 0's lines go. ``nan_at_step`` (testing hook, also the FASTAR_TEST_NAN_AT_STEP
    environment variable of ``fastar train``) poisons that 1-based step's loss with NaN."""

    model: str | None = None
    data: str | None = None
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    out: str = "runs/fastar"
    resume: bool = False
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    config: dict | None = None
    levels: int | None = None
    conditional: bool = False
    limit: int | None = None
    eval_limit: int | None = None
    segment: int = 4096
    progress: bool = True
    log: Callable = print
    nan_at_step: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.out, "last.pt")


@dataclasses.dataclass
class _Progress:
    """Where a run stands: restored from a checkpoint, saved into the next one."""

    epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)


class _Objective(nn.Module):
    """Wraps a model so DDP sees one forward: (x, cond) -> (mean NLL in nats, bits/dim), both scalars."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, cond=None):
        nats = self.model.nll(x, cond).mean()
        return nats, nats / (x[0].numel() * LN2)


# ---------------------------------------------------------------------------- devices

def check_device(device: str) -> str:
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no GPU is visible to torch")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:K") from None
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:K")
    return device


def _dist_setup(device: str):
    """(rank, world size, device) from the torchrun environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def _autocast(device: str, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    # bfloat16 needs no loss scaling (float16 would); H100 and recent CPUs run it natively.
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, data: registry.Dataset, device: str, batch_size: int = 256,
             limit: int | None = None, conditional: bool = False, amp: bool = False) -> float:
    """Mean held-out bits/dim (bits per audio sample for audio models) over ``data.test``."""
    obj = _Objective(model)
    was = model.training
    model.eval()
    x_all = data.test[:limit] if limit else data.test
    y_all = data.test_labels[:limit] if (limit and data.test_labels is not None) else data.test_labels
    total, count = 0.0, 0
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device)
        cond = y_all[i:i + batch_size].to(device) if (conditional and y_all is not None) else None
        with _autocast(device, amp):
            _, bpd = obj(x, cond)
        total += float(bpd) * len(x)
        count += len(x)
    model.train(was)
    return total / max(count, 1)


# ---------------------------------------------------------------------------- the steps of a run

def _validate(cfg: TrainConfig) -> TrainConfig:
    name = registry.canonical_model(cfg.model if cfg.model is not None else registry.default_model())
    data = cfg.data if cfg.data is not None else registry.spec(name).datasets[0]
    for k, v in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k.replace('_', '-')} must be a positive integer, got {v!r}")
    # None means "all"; 0 or a negative count would silently mean "all" or "all but" through slicing
    for k, v in (("limit", cfg.limit), ("eval_limit", cfg.eval_limit)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{k.replace('_', '-')} must be a positive integer (or None for all), got {v!r}")
    if not isinstance(cfg.segment, int) or isinstance(cfg.segment, bool) or cfg.segment < 1:
        raise ValueError(f"segment must be a positive integer (samples per training segment), got {cfg.segment!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= 2**63 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {cfg.seed!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    if cfg.nan_at_step is None:
        cfg = dataclasses.replace(cfg, nan_at_step=int(os.environ.get("FASTAR_TEST_NAN_AT_STEP", "0") or 0))
    return dataclasses.replace(cfg, model=name, data=data, device=check_device(cfg.device))


def _open_checkpoint(cfg: TrainConfig, say) -> dict | None:
    """The checkpoint to resume, None for a fresh run; refuses to overwrite one without --resume."""
    if os.path.exists(cfg.path):
        if not cfg.resume:
            raise ValueError(f"{cfg.path} already exists; pass --resume to continue it, or choose another --out")
        ck = ckpt_mod.load_checkpoint(cfg.path, expect_model=cfg.model)
        if ck["data"].get("name") != cfg.data:
            raise ValueError(f"{cfg.path} was trained on --data {ck['data'].get('name')}, not {cfg.data}")
        return ck
    if cfg.resume:
        say(f"no checkpoint at {cfg.path} yet: starting from scratch")
    return None


def _load_data(cfg: TrainConfig, ck: dict | None) -> registry.Dataset:
    return registry.load_dataset(cfg.data, levels=(ck["data"]["levels"] if ck else cfg.levels), segment=cfg.segment)


def _model_config(cfg: TrainConfig, ds, ck: dict | None) -> tuple[dict, bool]:
    """(the model's constructor config, whether it is fed the labels): the checkpoint's when resuming."""
    if ck:
        return dict(ck["config"]), bool(ck["train"].get("conditional", False))
    model_cfg = registry.default_config(cfg.model, ds)
    if cfg.conditional:
        over = registry.conditional_config(cfg.model, ds)
        if not over:
            able = [k for k in registry.specs() if k in registry.models_for(ds)
                    and registry.conditional_config(k, ds)]
            hint = (f"use {' or '.join(able)}" if able else "choose a data set with class labels")
            raise ValueError(f"--conditional: {cfg.model} cannot be class-conditional on {cfg.data}; {hint}")
        model_cfg.update(over)
    given = cfg.config or {}
    if not cfg.conditional:
        # a conditioning argument without --conditional builds a model that is never fed its labels
        keys = set((registry.conditional_config(cfg.model, ds) or {})) | {"num_classes"}
        named = [k for k in keys if given.get(k) is not None]
        if named:
            raise ValueError(f"--model-arg {named[0]}={given[named[0]]}: a class-conditional model is trained "
                             f"with --conditional (which feeds it the labels of {cfg.data}); add --conditional")
    elif "num_classes" in given and isinstance(ds.info().get("num_classes"), int) and \
            given["num_classes"] != ds.info()["num_classes"]:
        raise ValueError(f"--model-arg num_classes={given['num_classes']}: {cfg.data} has "
                         f"{ds.info()['num_classes']} classes (--conditional sets num_classes from the data)")
    model_cfg.update(given)
    return model_cfg, cfg.conditional


def _build(cfg: TrainConfig, model_cfg: dict, device: str, ck: dict | None, say):
    """(model, optimizer, progress), seeded, and restored from the checkpoint when resuming."""
    torch.manual_seed(cfg.seed)
    net = registry.build_model(cfg.model, model_cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    if not ck:
        return net, opt, _Progress()
    net.load_state_dict(ck["state_dict"])
    if ck["optimizer"] is not None:
        opt.load_state_dict(ck["optimizer"])
        for g in opt.param_groups:
            g["lr"] = cfg.lr  # a resumed run may change the learning rate
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    say(f"resumed {cfg.path}: epoch {ck['epoch']}, step {ck['step']}")
    return net, opt, _Progress(ck["epoch"], ck["step"], list(ck["history"]), list(ck["evals"]))


def _wrap(net: nn.Module, device: str, world: int) -> nn.Module:
    obj = _Objective(net)
    if world <= 1:
        return obj
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Some models hold parameters that feed nothing on the loss path (e.g. a last block's unused
    # output branch), so DDP must look for unused ones.
    return DDP(obj, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
               find_unused_parameters=True)


def _loader(cfg: TrainConfig, ds, rank: int, world: int):
    """(loader, sampler, number of training examples) over this rank's shard."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    probs = getattr(ds, "train_probs", None)
    src = ds.train if probs is None else probs          # stochastic binarisation: bits drawn per batch below
    x = src[:cfg.limit] if cfg.limit else src
    y = (ds.train_labels[:cfg.limit] if cfg.limit else ds.train_labels) if ds.train_labels is not None else None
    tensors = TensorDataset(x) if y is None else TensorDataset(x, y)
    sampler = DistributedSampler(tensors, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    loader = DataLoader(tensors, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"batch size {cfg.batch_size} x {world} process(es) is larger than the {len(x)} "
                         "training examples")
    if probs is not None:
        loader = _FreshBits(loader, sampler, cfg.seed, rank)
    return loader, sampler, len(x)


class _FreshBits:
    """Batches of pixel probabilities -> fresh binary images, a generator seeded by (seed, epoch, rank):
    new bits every epoch, the same bits when a run is resumed."""

    def __init__(self, loader, sampler, seed: int, rank: int):
        self.loader, self.sampler, self.seed, self.rank = loader, sampler, seed, rank

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.sampler.epoch) * 4099 + self.rank)
        for batch in self.loader:
            p = batch[0]
            yield ((torch.rand(p.shape, generator=g) < p).to(torch.int64), *batch[1:])


class _Log:
    """Rank 0's lines: to ``cfg.log`` and appended to ``OUT/train.log``; other ranks stay silent."""

    def __init__(self, cfg: TrainConfig, main: bool):
        self.say = cfg.log if main else (lambda *a, **k: None)
        self.main, self.file = main, os.path.join(cfg.out, "train.log")

    def __call__(self, line: str, to_file: bool = True, to_screen: bool = True):
        if to_screen:
            self.say(line)
        if self.main and to_file:
            os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
            with open(self.file, "a") as f:
                f.write(line + "\n")


def _all_reduce_mean(vals: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(vals)  # every rank sees the same (possibly non-finite) loss and stops together
        vals /= world
    return vals


def _train_epoch(cfg: TrainConfig, epoch: int, obj, opt, loader, conditional: bool, device: str, world: int,
                 prog: _Progress, log: _Log) -> dict:
    """One pass over this rank's shard; updates ``prog`` (step, history) and returns the epoch's means."""
    bar = loader
    if cfg.progress and log.main:
        from tqdm.auto import tqdm

        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    t0, seen, run_loss, run_bpd = time.perf_counter(), 0, 0.0, 0.0
    for batch in bar:
        x = batch[0].to(device)
        cond = batch[1].to(device) if (conditional and len(batch) > 1) else None
        with _autocast(device, cfg.amp):
            loss, bpd = obj(x, cond)
        prog.step += 1
        if cfg.nan_at_step and prog.step == cfg.nan_at_step:
            loss = loss * float("nan")
        lv, bv = _all_reduce_mean(torch.stack([loss.detach().float(), bpd.detach().float()]), world).tolist()
        first = prog.history[0] if prog.history else lv
        if not math.isfinite(lv) or abs(lv) > DIVERGED * max(abs(first), 1.0):
            kept = cfg.path if os.path.exists(cfg.path) else "none written yet"
            why = "" if not math.isfinite(lv) else f" nats, over {DIVERGED:g}x the first step's {first:.4g}: diverged"
            msg = (f"loss is {lv:.4g}{why} at step {prog.step} (epoch {epoch + 1}); training stopped, the last "
                   f"good checkpoint is kept ({kept}); try a lower --lr (now {cfg.lr:g})")
            log(msg, to_screen=False)
            raise TrainingDiverged(msg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        prog.history.append(lv)
        seen += len(x) * world
        run_loss += lv
        run_bpd += bv
        if bar is not loader:
            bar.set_postfix(loss=f"{lv:.4g}", bpd=f"{bv:.4f}",
                            sps=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
    if bar is not loader:
        bar.close()
    nb = len(loader)
    return dict(train_loss=run_loss / nb, train_bpd=run_bpd / nb, seen=seen, seconds=time.perf_counter() - t0)


def _end_epoch(cfg: TrainConfig, epoch: int, stats: dict, net, opt, ds, model_cfg: dict, conditional: bool,
               device: str, world: int, prog: _Progress, log: _Log) -> None:
    """Rank 0: held-out evaluation, the checkpoint and the epoch's log line."""
    if log.main:
        held = evaluate(net, ds, device, limit=cfg.eval_limit, conditional=conditional, amp=cfg.amp)
        prog.evals.append(dict(epoch=epoch + 1, step=prog.step, train_loss=stats["train_loss"],
                               train_bpd=stats["train_bpd"], test_bpd=held, seconds=stats["seconds"]))
        train_args = dict(model=cfg.model, data=cfg.data, levels=ds.levels, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, conditional=conditional,
                          limit=cfg.limit, amp=cfg.amp, world_size=world)
        ckpt_mod.save_checkpoint(cfg.path, cfg.model, model_cfg, net, opt, epoch=epoch + 1, step=prog.step,
                                 data=ds.info(), train=train_args, history=prog.history, evals=prog.evals)
        log(f"epoch {epoch + 1}/{cfg.epochs}: step {prog.step}, train loss {stats['train_loss']:.4f} nats, train "
            f"{stats['train_bpd']:.4f} bits/dim, held-out {held:.4f} bits/dim, "
            f"{stats['seen'] / stats['seconds']:.0f} samples/s, {stats['seconds']:.1f} s -> {cfg.path}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank races ahead of the checkpoint


# ---------------------------------------------------------------------------- the run

def run(cfg: TrainConfig) -> dict:
    """Train and checkpoint; returns {"model", "checkpoint", "history", "evals", "epoch", "step"}."""
    cfg = _validate(cfg)
    rank, world, device = _dist_setup(cfg.device)
    log = _Log(cfg, rank == 0)
    ck = _open_checkpoint(cfg, log.say)
    ds = _load_data(cfg, ck)
    model_cfg, conditional = _model_config(cfg, ds, ck)
    net, opt, prog = _build(cfg, model_cfg, device, ck, log.say)
    obj = _wrap(net, device, world)
    loader, sampler, n_train = _loader(cfg, ds, rank, world)
    n_par = sum(p.numel() for p in net.parameters())
    log(f"{cfg.model} {model_cfg} ({n_par:,} parameters) on {cfg.data} ({n_train} train / {len(ds.test)} held-out, "
        f"levels {ds.levels}), batch {cfg.batch_size} x {world}, lr {cfg.lr}, seed {cfg.seed}, device {device}"
        f"{', amp bf16' if cfg.amp else ''}")
    if prog.epoch >= cfg.epochs:
        log.say(f"{cfg.path} already holds {prog.epoch} epoch(s) >= --epochs {cfg.epochs}: nothing to do")
    epoch0 = prog.epoch
    for epoch in range(epoch0, cfg.epochs):
        sampler.set_epoch(epoch)  # the batch order is a function of (seed, epoch) alone: resume replays it
        net.train()
        stats = _train_epoch(cfg, epoch, obj, opt, loader, conditional, device, world, prog, log)
        _end_epoch(cfg, epoch, stats, net, opt, ds, model_cfg, conditional, device, world, prog, log)
    return dict(model=net, checkpoint=cfg.path, history=prog.history, evals=prog.evals,
                epoch=max(cfg.epochs, epoch0), step=prog.step)


def train(model: str | TrainConfig | None = None, data: str | None = None, **options) -> dict:
    """``train(MODEL, "digits", epochs=2, ...)``: :func:`run` of a :class:`TrainConfig` built from
    the arguments (or ``train(TrainConfig(...), **overrides)``). ``_nan_at_step`` is accepted as the
    old spelling of ``nan_at_step``."""
    if "_nan_at_step" in options:
        options["nan_at_step"] = options.pop("_nan_at_step")
    if isinstance(model, TrainConfig):
        cfg = dataclasses.replace(model, **({"data": data} if data is not None else {}), **options)
    else:
        cfg = TrainConfig(model=model, data=data, **options)
    return run(cfg)
