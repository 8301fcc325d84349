"""The user's door on the command line: ``fastar demo``, ``fastar train``, ``fastar sample``.

Kept out of :mod:`fastar.cli` (which holds ``info`` and ``bench``) so each command reads on
its own. Every failure the user can cause (unknown model or data set, a checkpoint of
another model, a missing file, a ``--prefix`` image of the wrong size) raises ValueError
or FileNotFoundError, which :func:`fastar.cli.main` prints as one line with exit status 2.
"""
from __future__ import annotations

import glob
import os
import time

import torch

DEMO_CHECKPOINT = "gated_pixelcnn_mnist"
DEMO_SPEECH_CHECKPOINT = "wavenet_speech"


# ---------------------------------------------------------------------------- helpers

def _parse_model_args(items) -> dict:
    """['layers=4', 'channels=16'] -> {'layers': 4, 'channels': 16} (ints, floats, true/false/none, else str)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--model-arg takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            val = low == "true"
        elif low == "none":
            val = None
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k.strip()] = val
    return out


def _resolve_checkpoint(ref: str) -> str:
    """A path, or the name of a shipped checkpoint (``gated_pixelcnn_mnist``)."""
    if os.path.exists(ref):
        return ref
    from fastar.checkpoints import SHIPPED, shipped_path

    p = shipped_path(ref)
    if p:
        return p
    if ref in SHIPPED:
        raise FileNotFoundError(f"the shipped checkpoint {ref!r} is not in this install (fastar/checkpoints/)")
    raise FileNotFoundError(f"checkpoint not found: {ref}")


def _set_threads(n):
    if n:
        torch.set_num_threads(n)


def _seeded(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device).type if str(device).startswith("cuda") else "cpu")
    g.manual_seed(seed)
    return g


def _timed(fn, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


# ---------------------------------------------------------------------------- train

def _cmd_train(args) -> int:
    from fastar import registry
    from fastar.train import train

    registry.canonical_model(args.model)  # unknown model: one line before any data is read
    if args.data not in registry.DATASETS:
        raise ValueError(f"unknown data set {args.data!r}; choose from {', '.join(registry.DATASETS)}")
    _set_threads(args.threads)
    train(args.model, args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, out=args.out,
          resume=args.resume, device=args.device, amp=args.amp, seed=args.seed,
          config=_parse_model_args(args.model_arg), levels=args.levels, conditional=args.conditional,
          limit=args.limit, eval_limit=args.eval_limit, segment=args.segment, progress=not args.no_progress)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun: leave the group cleanly
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------- sample

def _sample_images(model, ckpt, args, method, generator, progress=True):
    from fastar.data.images import load_image

    info = ckpt["data"]
    C, H, W = info["shape"]
    cond = None
    if args.klass is not None:
        nc = ckpt["config"].get("num_classes")
        if not nc:
            raise ValueError("--class needs a class-conditional model (trained with --conditional); this one is not")
        if not 0 <= args.klass < nc:
            raise ValueError(f"--class must lie in [0, {nc}), got {args.klass}")
        cond = torch.full((args.n,), args.klass, dtype=torch.int64)
    elif ckpt["config"].get("num_classes"):
        cond = torch.arange(args.n, dtype=torch.int64) % ckpt["config"]["num_classes"]
    prefix = mask = None
    if args.prefix:
        img = load_image(args.prefix, C, info["levels"], (H, W))
        prefix = img.expand(args.n, C, H, W).contiguous()
        mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
        mask[:, :, : H // 2] = True  # the top half is given, the bottom half is drawn
    return model.sample(args.n, (H, W), cond=cond, generator=generator, temperature=args.temperature,
                        method=method, prefix=prefix, mask=mask, progress=progress)


def _write_audio(codes: torch.Tensor, path: str, sample_rate: int, quantization: int = 256):
    """(B, T) mu-law codes -> one WAV, the clips joined by 0.25 s of silence."""
    from fastar.data import mu_law_decode
    from fastar.data.audio import write_wav

    gap = torch.zeros(sample_rate // 4)
    parts = []
    for i, c in enumerate(codes.cpu()):
        if i:
            parts.append(gap)
        parts.append(mu_law_decode(c, quantization).float())
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    write_wav(path, torch.cat(parts), sample_rate)


def _cmd_sample(args) -> int:
    from fastar import checkpoint, registry
    from fastar.data.images import save_image_grid

    if args.n < 1:
        raise ValueError(f"-n must be a positive integer, got {args.n}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    from fastar.train import check_device

    device = check_device(args.device)
    _set_threads(args.threads)
    ext = os.path.splitext(args.out)[1].lower()
    path = _resolve_checkpoint(args.checkpoint)
    ckpt = checkpoint.load_checkpoint(path)
    kind = registry.model_kind(ckpt["model"])
    if kind == "image" and ext != ".png":
        raise ValueError(f"{path} holds an image model ({ckpt['model']}); --out must end in .png, got {args.out}")
    if kind == "audio" and ext != ".wav":
        raise ValueError(f"{path} holds an audio model ({ckpt['model']}); --out must end in .wav, got {args.out}")
    if kind == "audio" and (args.prefix or args.klass is not None):
        raise ValueError("--prefix and --class apply to image models; this checkpoint holds a WaveNet")
    model, ckpt = checkpoint.load_model(ckpt, device=device)
    gen = _seeded(args.seed, device)
    if kind == "image":
        x, dt = _timed(lambda: _sample_images(model, ckpt, args, args.method, gen, not args.no_progress), device)
        save_image_grid(x, args.out, ckpt["data"]["levels"], scale=4 if ckpt["data"]["shape"][-1] <= 8 else 1)
        what = f"{args.n} images"
    else:
        rate = ckpt["data"].get("sample_rate") or 16000
        length = args.length or rate
        codes, dt = _timed(lambda: model.generate(length, batch_size=args.n, temperature=args.temperature,
                                                  generator=gen, progress=not args.no_progress,
                                                  method="fast" if args.method == "cached" else "naive"), device)
        _write_audio(codes, args.out, rate, ckpt["config"].get("quantization", 256))
        what = f"{args.n} clip(s) of {length} samples"
    print(f"{what} from {ckpt['model']} ({args.method} sampler, {device}) in {dt:.2f} s -> {args.out}")
    return 0


# ---------------------------------------------------------------------------- demo

def _demo_checkpoint(args, shipped_name, model, data, train_kw):
    """The checkpoint the demo uses: --checkpoint, else the shipped one, else a quick training run."""
    from fastar.checkpoints import shipped_path

    if args.checkpoint:
        return _resolve_checkpoint(args.checkpoint)
    p = shipped_path(shipped_name)
    if p and not args.train:
        print(f"using the shipped checkpoint {p}")
        return p
    from fastar.train import train

    out = os.path.join(args.workdir, f"{model}_{data}")
    last = os.path.join(out, "last.pt")
    print(f"training {model} on {data} into {out} (the shipped checkpoint is {'skipped' if p else 'missing'})")
    train(model, data, out=out, device=args.device, resume=True, progress=not args.no_progress, **train_kw)
    return last


def _cmd_demo(args) -> int:
    from fastar import checkpoint, registry

    from fastar.train import check_device

    device = check_device(args.device)
    _set_threads(args.threads)
    name = registry.canonical_model(args.model)
    if registry.model_kind(name) == "audio":
        return _demo_speech(args, name, device)
    if name != "gated_pixelcnn" and not args.checkpoint:
        args.train = True  # only the GatedPixelCNN is shipped
    path = _demo_checkpoint(args, DEMO_CHECKPOINT if name == "gated_pixelcnn" else "",
                            name, "mnist", dict(epochs=args.epochs, batch_size=64, lr=3e-3,
                                                conditional=name == "gated_pixelcnn", limit=args.limit,
                                                config=dict(layers=5, channels=16)))
    ckpt = checkpoint.load_checkpoint(path)
    if registry.model_kind(ckpt["model"]) != "image":
        raise ValueError(f"{path} holds a {ckpt['model']}; the image demo needs an image model")
    model, ckpt = checkpoint.load_model(ckpt, device=device)
    info = ckpt["data"]
    from fastar.train import evaluate

    try:
        ds = registry.load_dataset(info["name"], levels=info["levels"])
    except FileNotFoundError as e:  # the samplers do not need the data: say what is missing and go on
        saved = ckpt["evals"][-1]["test_bpd"] if ckpt.get("evals") else None
        print(f"held-out data unavailable ({e}); bits/dim recorded at training time: "
              + (f"{saved:.4f}" if saved is not None else "none"))
    else:
        t = time.perf_counter()
        bpd = evaluate(model, ds, device, conditional=bool(ckpt["config"].get("num_classes")))
        print(f"{ckpt['model']} on {info['name']} held-out ({len(ds.test)} images): {bpd:.4f} bits/dim "
              f"({time.perf_counter() - t:.1f} s)")

    class _A:  # the sample command's arguments, for its image helper
        n, klass, prefix, temperature = args.n, None, None, 1.0

    fast, t_fast = _timed(lambda: _sample_images(model, ckpt, _A, "cached", _seeded(args.seed, device),
                                                 not args.no_progress), device)
    print(f"cached sampler: {args.n} images in {t_fast:.2f} s")
    slow, t_slow = _timed(lambda: _sample_images(model, ckpt, _A, "naive", _seeded(args.seed, device),
                                                 not args.no_progress), device)
    print(f"naive sampler:  {args.n} images in {t_slow:.2f} s")
    from fastar.data.images import save_image_grid

    save_image_grid(fast, args.out, info["levels"], nrow=10 if args.n % 10 == 0 else None,
                    scale=max(1, 64 // info["shape"][-1]))
    same = (fast == slow).float().mean().item()
    print(f"speed-up of the cached sampler: {t_slow / t_fast:.1f}x ({device}, batch {args.n}, "
          f"{torch.get_num_threads()} threads); the two samplers agree on {100 * same:.2f}% of pixels")
    print(f"wrote {args.out}")
    return 0


def _demo_speech(args, name, device) -> int:
    from fastar import checkpoint

    path = _demo_checkpoint(args, DEMO_SPEECH_CHECKPOINT, name, "speech",
                            dict(epochs=args.epochs, batch_size=8, lr=1e-3, limit=args.limit))
    model, ckpt = checkpoint.load_model(path, device=device, expect_model="wavenet")
    rate = ckpt["data"].get("sample_rate") or 16000
    length = args.length or rate // 4
    gen = lambda: _seeded(args.seed, device)  # noqa: E731
    fast, t_fast = _timed(lambda: model.generate(length, batch_size=args.n, generator=gen(), method="fast",
                                                 progress=not args.no_progress), device)
    print(f"fast (queued) generation: {args.n} x {length} samples in {t_fast:.2f} s")
    slow, t_slow = _timed(lambda: model.generate(length, batch_size=args.n, generator=gen(), method="naive",
                                                 progress=not args.no_progress), device)
    print(f"naive generation:         {args.n} x {length} samples in {t_slow:.2f} s")
    out = os.path.splitext(args.out)[0] + ".wav"
    _write_audio(fast, out, rate, ckpt["config"].get("quantization", 256))
    print(f"speed-up of the fast generator: {t_slow / t_fast:.1f}x ({device}); wrote {out}")
    return 0


# ---------------------------------------------------------------------------- bench plot

def _plot_new_results(out_dir: str, since: float) -> None:
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


# ---------------------------------------------------------------------------- parsers

def _add_door_commands(sub) -> None:
    pd = sub.add_parser("demo", help="sample the shipped binary-MNIST GatedPixelCNN (or train one) with the cached "
                                     "and the naive sampler; writes samples.png, prints bits/dim and the speed-up")
    pd.add_argument("--model", default="gated_pixelcnn", help="gated_pixelcnn (default), pixelcnn or wavenet")
    pd.add_argument("--checkpoint", default=None, help="use this checkpoint instead of the shipped one")
    pd.add_argument("--train", action="store_true", help="train a fresh model even when one is shipped")
    pd.add_argument("--epochs", type=int, default=3, help="epochs when the demo trains (default: %(default)s)")
    pd.add_argument("--limit", type=int, default=None, help="train on only the first N examples")
    pd.add_argument("--workdir", default="fastar-demo", help="where a demo training run goes (default: %(default)s)")
    pd.add_argument("-n", type=int, default=20, help="images (or clips) per sampler (default: %(default)s)")
    pd.add_argument("--length", type=int, default=None, help="WaveNet samples per clip (default: 1/4 s)")
    pd.add_argument("--out", default="samples.png", help="image grid (default: %(default)s; .wav for WaveNet)")
    pd.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    pd.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--no-progress", action="store_true", help="no progress bars")
    pd.set_defaults(func=_cmd_demo)

    pt = sub.add_parser("train", help="train a model on a bundled real data set, with checkpoints (torchrun-ready)")
    pt.add_argument("model", metavar="MODEL", help="pixelcnn, gated_pixelcnn or wavenet")
    pt.add_argument("--data", required=True, help="mnist, digits, patches or speech")
    pt.add_argument("--epochs", type=int, default=1)
    pt.add_argument("--batch-size", type=int, default=64, help="examples per process per step (default: %(default)s)")
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--out", required=True, help="folder for last.pt and train.log")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (the last complete epoch)")
    pt.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    pt.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--levels", type=int, default=None, help="grey levels (default: 2 for mnist/digits, 256 patches)")
    pt.add_argument("--conditional", action="store_true", help="condition on the class labels (mnist, digits)")
    pt.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                    help="model constructor argument, e.g. --model-arg layers=5 (repeatable)")
    pt.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    pt.add_argument("--eval-limit", type=int, default=None, help="evaluate on only the first N held-out examples")
    pt.add_argument("--segment", type=int, default=4096, help="speech: samples per training segment")
    pt.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.set_defaults(func=_cmd_train)

    ps = sub.add_parser("sample", help="load a saved model and write an image grid (.png) or audio (.wav)")
    ps.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, a training --out folder, or a "
                                                             "shipped name (gated_pixelcnn_mnist)")
    ps.add_argument("-n", type=int, default=64, help="images or clips (default: %(default)s)")
    ps.add_argument("--method", default="cached", choices=["cached", "naive"])
    ps.add_argument("--out", required=True, help="FILE.png (image models) or FILE.wav (WaveNet)")
    ps.add_argument("--class", dest="klass", type=int, default=None,
                    help="class label for every image (conditional models; default: the batch cycles 0 .. K-1)")
    ps.add_argument("--temperature", type=float, default=1.0)
    ps.add_argument("--prefix", default=None, help="an image of the model's size: its top half is kept, the rest "
                                                   "drawn")
    ps.add_argument("--length", type=int, default=None, help="WaveNet: samples per clip (default: 1 s)")
    ps.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    ps.add_argument("--threads", type=int, default=None)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--no-progress", action="store_true")
    ps.set_defaults(func=_cmd_sample)
