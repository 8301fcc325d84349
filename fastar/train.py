"""A plain training loop for every registered model, with checkpoints, resume and DDP.

``train(model, data, epochs, batch_size, lr, out, resume=False, device="cpu", amp=False, ...)``
is what ``fastar train`` runs. Read it top to bottom: load the data set (a fixed split),
build the model from a config (seeded), Adam, then per epoch: a DistributedSampler order
(seed + epoch, so the order depends only on the epoch), a tqdm bar showing loss,
bits/dim and samples/s, a held-out evaluation, and an atomic checkpoint ``OUT/last.pt``
(see :mod:`fastar.checkpoint`), plus one line per epoch appended to ``OUT/train.log``.

Reproducible resume: the checkpoint holds the weights, the optimizer state, the epochs
and steps done, the RNG state and the per-step loss history, and the batch order is a
function of (seed, epoch) alone, so ``--resume`` after an interruption gives on CPU the
same per-step losses, bit for bit, as one uninterrupted run. A crash mid-epoch resumes
from the last complete epoch.

Divergence: a NaN or inf loss stops training with :class:`TrainingDiverged`, naming the
step; nothing is written after it, so ``OUT/last.pt`` stays the last good checkpoint.

Distributed: under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1 in the environment)
the loss module is wrapped in DistributedDataParallel (nccl on cuda, gloo on cpu; rank r
uses cuda:LOCAL_RANK), each rank reads its DistributedSampler shard with ``batch_size``
examples per step (global batch N * batch_size), and rank 0 alone evaluates, logs and
writes checkpoints.

Losses: image models minimise the mean NLL per image in nats; bits/dim is that over
C * H * W * ln 2. WaveNet minimises the mean NLL per sample in nats; its bits/dim is bits
per audio sample.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from torch import nn

from fastar import checkpoint as ckpt_mod
from fastar import registry

__all__ = ["train", "TrainingDiverged", "evaluate"]

LN2 = math.log(2.0)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the checkpoint kept."""


class _Objective(nn.Module):
    """Wraps a model so DDP sees one forward: (x, cond) -> (mean NLL in nats, bits/dim), both scalars."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x, cond=None):
        nats = self.model.nll(x, cond).mean()
        return nats, nats / (x[0].numel() * LN2)


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


def _autocast(device: str, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    # bfloat16 needs no loss scaling (float16 would); H100 and recent CPUs run it natively.
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, data: registry.Dataset, device: str, batch_size: int = 256,
             limit: int | None = None, conditional: bool = False, amp: bool = False) -> float:
    """Mean held-out bits/dim (bits per audio sample for WaveNet) over ``data.test``."""
    obj = _Objective(model, data.kind)
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


def train(model: str = "gated_pixelcnn", data: str = "mnist", epochs: int = 1, batch_size: int = 64,
          lr: float = 1e-3, out: str = "runs/fastar", resume: bool = False, device: str = "cpu",
          amp: bool = False, seed: int = 0, config: dict | None = None, levels: int | None = None,
          conditional: bool = False, limit: int | None = None, eval_limit: int | None = None,
          segment: int = 4096, progress: bool = True, log=print, _nan_at_step: int | None = None) -> dict:
    """Train and checkpoint; returns {"model", "checkpoint", "history", "evals", "epoch", "step"}.

    model: registry key; data: mnist | digits | patches | speech; batch_size: examples per
    process per step; config: overrides of the model's default config; conditional: feed
    class labels (mnist, digits) to a GatedPixelCNN(num_classes=10); limit / eval_limit:
    use only the first examples of each split (smoke runs). ``_nan_at_step`` (testing
    hook, also the FASTAR_TEST_NAN_AT_STEP environment variable of ``fastar train``)
    poisons that 1-based step's loss with NaN.
    """
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    name = registry.canonical_model(model)
    registry.model_class(name)  # a clear error now for a model this build lacks
    for k, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k.replace('_', '-')} must be a positive integer, got {v!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    device = check_device(device)
    rank, world, device = _dist_setup(device)
    main = rank == 0
    say = log if main else (lambda *a, **k: None)

    path = os.path.join(out, "last.pt")
    ck = None
    if os.path.exists(path):
        if not resume:
            raise ValueError(f"{path} already exists; pass --resume to continue it, or choose another --out")
        ck = ckpt_mod.load_checkpoint(path, expect_model=name)
        if ck["data"].get("name") != data:
            raise ValueError(f"{path} was trained on --data {ck['data'].get('name')}, not {data}")
    elif resume:
        say(f"no checkpoint at {path} yet: starting from scratch")

    ds = registry.load_dataset(data, levels=(ck["data"]["levels"] if ck else levels), segment=segment)
    if ck:
        cfg, conditional = dict(ck["config"]), bool(ck["train"].get("conditional", False))
    else:
        cfg = registry.default_config(name, ds)
        if conditional:
            if ds.num_classes is None or registry.model_kind(name) != "image" or name == "pixelcnn":
                raise ValueError(f"--conditional needs a labelled image data set (mnist, digits) and "
                                 f"gated_pixelcnn, got {name} on {data}")
            cfg["num_classes"] = ds.num_classes
        cfg.update(config or {})

    torch.manual_seed(seed)
    net = registry.build_model(name, cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    epoch0, step, history, evals = 0, 0, [], []
    if ck:
        net.load_state_dict(ck["state_dict"])
        if ck["optimizer"] is not None:
            opt.load_state_dict(ck["optimizer"])
            for g in opt.param_groups:
                g["lr"] = lr
        epoch0, step, history, evals = ck["epoch"], ck["step"], list(ck["history"]), list(ck["evals"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        say(f"resumed {path}: epoch {epoch0}, step {step}")

    obj = _Objective(net, ds.kind)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Unused parameters exist (the last gated block's vertical-stack output feeds nothing), so DDP must look.
        obj = DDP(obj, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                  find_unused_parameters=True)

    x_train = ds.train[:limit] if limit else ds.train
    y_train = (ds.train_labels[:limit] if limit else ds.train_labels) if ds.train_labels is not None else None
    tensors = (x_train,) if y_train is None else (x_train, y_train)
    sampler = DistributedSampler(TensorDataset(*tensors), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"batch size {batch_size} x {world} process(es) is larger than the {len(x_train)} "
                         "training examples")
    train_args = dict(model=name, data=data, levels=ds.levels, epochs=epochs, batch_size=batch_size, lr=lr,
                      seed=seed, conditional=conditional, limit=limit, amp=amp, world_size=world)
    logf = os.path.join(out, "train.log")
    if main:
        os.makedirs(out, exist_ok=True)
        n_par = sum(p.numel() for p in net.parameters())
        head = (f"{name} {cfg} ({n_par:,} parameters) on {data} ({len(x_train)} train / {len(ds.test)} held-out, "
                f"levels {ds.levels}), batch {batch_size} x {world}, lr {lr}, seed {seed}, device {device}"
                f"{', amp bf16' if amp else ''}")
        say(head)
        with open(logf, "a") as f:
            f.write(head + "\n")

    if epoch0 >= epochs:
        say(f"{path} already holds {epoch0} epoch(s) >= --epochs {epochs}: nothing to do")
    nan_at = _nan_at_step if _nan_at_step is not None else int(os.environ.get("FASTAR_TEST_NAN_AT_STEP", "0") or 0)
    for epoch in range(epoch0, epochs):
        sampler.set_epoch(epoch)
        net.train()
        bar = loader
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        t0, seen, run_loss, run_bpd = time.perf_counter(), 0, 0.0, 0.0
        for batch in bar:
            x = batch[0].to(device)
            cond = batch[1].to(device) if (conditional and len(batch) > 1) else None
            with _autocast(device, amp):
                loss, bpd = obj(x, cond)
            step += 1
            if nan_at and step == nan_at:
                loss = loss * float("nan")
            vals = torch.stack([loss.detach().float(), bpd.detach().float()])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(vals)  # every rank sees the same (possibly non-finite) loss and stops together
                vals /= world
            lv, bv = vals.tolist()
            if not math.isfinite(lv):
                kept = path if os.path.exists(path) else "none written yet"
                msg = (f"loss is {lv} at step {step} (epoch {epoch + 1}); training stopped, the last good "
                       f"checkpoint is kept ({kept}); try a lower --lr")
                if main:
                    with open(logf, "a") as f:
                        f.write(msg + "\n")
                raise TrainingDiverged(msg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(lv)
            seen += len(x) * world
            run_loss += lv
            run_bpd += bv
            if bar is not loader:
                bar.set_postfix(loss=f"{lv:.4g}", bpd=f"{bv:.4f}",
                                sps=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
        if bar is not loader:
            bar.close()
        dt = time.perf_counter() - t0
        nb = len(loader)
        if main:
            held = evaluate(net, ds, device, limit=eval_limit, conditional=conditional, amp=amp)
            evals.append(dict(epoch=epoch + 1, step=step, train_loss=run_loss / nb, train_bpd=run_bpd / nb,
                              test_bpd=held, seconds=dt))
            ckpt_mod.save_checkpoint(path, name, cfg, net, opt, epoch=epoch + 1, step=step, data=ds.info(),
                                     train=train_args, history=history, evals=evals)
            line = (f"epoch {epoch + 1}/{epochs}: step {step}, train loss {run_loss / nb:.4f} nats, train "
                    f"{run_bpd / nb:.4f} bits/dim, held-out {held:.4f} bits/dim, {seen / dt:.0f} samples/s, "
                    f"{dt:.1f} s -> {path}")
            say(line)
            with open(logf, "a") as f:
                f.write(line + "\n")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank races ahead of the checkpoint
    return dict(model=net, checkpoint=path, history=history, evals=evals, epoch=max(epochs, epoch0), step=step)
