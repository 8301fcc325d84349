"""The command line, run for real (``python -m fastar ...`` in a subprocess) on tiny settings."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model-arg", "layers=2", "--model-arg", "channels=8"]


def fastar(*args, env=None, check=True):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    e.pop("FASTAR_DEBUG", None)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "fastar", *map(str, args)], capture_output=True, text=True, env=e,
                       cwd=ROOT, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"fastar {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


class _Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def fastar_inprocess(capsys, *args):
    """The same entry point without a new interpreter (the subprocess tests prove the process-level behaviour)."""
    from fastar.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    c = capsys.readouterr()
    return _Result(rc, c.out, c.err)


def one_line_error(r, pattern):
    """A non-zero exit with exactly one line on stderr, matching `pattern`, and no traceback."""
    import re

    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A class-conditional GatedPixelCNN trained by `fastar train` on 64 real 8x8 digits."""
    out = tmp_path_factory.mktemp("run")
    r = fastar("train", "gated_pixelcnn", "--data", "digits", "--epochs", 1, "--batch-size", 16, "--lr", 3e-3,
               "--out", out, "--limit", 64, "--eval-limit", 32, "--conditional", "--no-progress", *TINY)
    assert "held-out" in r.stdout and "bits/dim" in r.stdout
    return out / "last.pt"


def test_train_writes_checkpoint_and_log(tiny_ckpt):
    ck = torch.load(tiny_ckpt, weights_only=True)
    assert ck["format"] == "fastar-checkpoint" and ck["model"] == "gated_pixelcnn"
    assert ck["config"] == dict(in_channels=1, levels=2, layers=2, channels=8, num_classes=10)
    assert ck["epoch"] == 1 and ck["step"] == 4 and ck["optimizer"] is not None and "torch" in ck["rng"]
    log = open(tiny_ckpt.parent / "train.log").read()
    assert "epoch 1/1" in log and "held-out" in log


def test_train_resume_continues_the_same_curve(tmp_path, capsys):
    args = ["train", "pixelcnn", "--data", "digits", "--batch-size", 16, "--out", None, "--limit", 48,
            "--eval-limit", 16, "--no-progress", *TINY]
    def run(out, epochs, *extra, sub=False):
        a = list(args)
        a[a.index(None)] = out
        if sub:
            return fastar(*a, "--epochs", epochs, *extra)
        r = fastar_inprocess(capsys, *a, "--epochs", epochs, *extra)
        assert r.returncode == 0, r.stderr
        return r
    torch.set_num_threads(1)
    run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    r = run(tmp_path / "b", 2, "--resume", sub=True)
    assert "resumed" in r.stdout
    ha = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["history"]
    hb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["history"]
    assert len(ha) == 6 and ha == hb


def test_train_nan_stops_with_one_line(tmp_path):
    r = fastar("train", "gated_pixelcnn", "--data", "digits", "--epochs", 3, "--batch-size", 16, "--out", tmp_path,
               "--limit", 32, "--eval-limit", 8, "--no-progress", *TINY, env={"FASTAR_TEST_NAN_AT_STEP": "3"},
               check=False)
    one_line_error(r, r"loss is nan at step 3 \(epoch 2\).*last good checkpoint is kept")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_sample_writes_png_and_both_methods_agree(tiny_ckpt, tmp_path):
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    r = fastar("sample", tiny_ckpt, "-n", 4, "--method", "cached", "--out", a, "--class", 3, "--temperature", 0.8,
               "--seed", 5, "--no-progress")
    assert "4 images" in r.stdout
    img = Image.open(a)
    assert img.mode == "L" and img.size == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # 8x8 digits shown 4x
    fastar("sample", tiny_ckpt, "-n", 4, "--method", "naive", "--out", b, "--class", 3, "--temperature", 0.8,
           "--seed", 5, "--no-progress")
    assert a.read_bytes() == b.read_bytes()


def test_sample_with_prefix_keeps_top_half(tiny_ckpt, tmp_path):
    import numpy as np
    from PIL import Image

    pre = np.zeros((8, 8), np.uint8)
    pre[1:4, 2:6] = 255
    Image.fromarray(pre, "L").save(tmp_path / "p.png")
    out = tmp_path / "s.png"
    fastar("sample", tiny_ckpt, "-n", 2, "--prefix", tmp_path / "p.png", "--out", out, "--no-progress")
    grid = np.asarray(Image.open(out))
    for k in range(2):  # each tile: 2-pixel border, 8x8 digit enlarged 4x
        tile = grid[2:34, 2 + k * 34: 34 + k * 34][::4, ::4]
        assert (tile[:4] == pre[:4]).all()


def test_sample_prefix_of_wrong_size(tiny_ckpt, tmp_path):
    from PIL import Image

    Image.new("L", (28, 28)).save(tmp_path / "big.png")
    r = fastar("sample", tiny_ckpt, "--prefix", tmp_path / "big.png", "--out", tmp_path / "s.png", check=False)
    one_line_error(r, r"big.png is 28x28 \(HxW\), but the model draws 8x8 images")


def test_bad_arguments_one_line(tiny_ckpt, tmp_path, capsys):
    # two through a real process (exit status, no traceback on stderr), the rest through the same main()
    one_line_error(fastar("train", "resnet", "--data", "digits", "--out", tmp_path, check=False),
                   r"^fastar train: error: unknown model 'resnet'; choose from pixelcnn, gated_pixelcnn")
    one_line_error(fastar("train", "pixelcnn", "--epochs", "x", "--data", "digits", "--out", tmp_path, check=False),
                   r"invalid int value: 'x'")

    def ip(*a, check=False):
        return fastar_inprocess(capsys, *a)

    one_line_error(ip("train", "pixelcnn", "--data", "cifar", "--out", tmp_path, check=False),
                   r"^fastar train: error: unknown data set 'cifar'; choose from mnist, digits, patches")
    one_line_error(ip("sample", tmp_path / "missing.pt", "--out", tmp_path / "s.png", check=False),
                   r"checkpoint not found: .*missing.pt")
    one_line_error(ip("sample", tiny_ckpt, "--prefix", tmp_path / "nope.png", "--out", tmp_path / "s.png",
                          check=False), r"image file not found")
    one_line_error(ip("sample", tiny_ckpt, "--out", tmp_path / "s.wav", check=False),
                   r"holds an image model \(gated_pixelcnn\); --out must end in .png")
    one_line_error(ip("sample", tiny_ckpt, "--class", 12, "--out", tmp_path / "s.png", check=False),
                   r"--class must lie in \[0, 10\)")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pt")
    one_line_error(ip("sample", tmp_path / "bare.pt", "--out", tmp_path / "s.png", check=False),
                   r"not a fastar checkpoint")
    one_line_error(ip("sample", "gated_pixelcnn_mnist", "--device", "cuda:7", "--out", tmp_path / "s.png"),
                   r"--device cuda:7 asked for, but no GPU is visible|--device cuda:7: only \d GPU\(s\) are visible")


def test_checkpoint_of_another_model(tiny_ckpt, tmp_path, capsys):
    import shutil

    shutil.copy(tiny_ckpt, tmp_path / "last.pt")
    r = fastar("train", "pixelcnn", "--data", "digits", "--out", tmp_path, "--resume", check=False)
    one_line_error(r, r"is a checkpoint of model 'gated_pixelcnn', not 'pixelcnn'")
    r = fastar_inprocess(capsys, "demo", "--checkpoint", tiny_ckpt, "--model", "wavenet", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_demo_on_a_given_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "samples.png"
    r = fastar("demo", "--checkpoint", tiny_ckpt, "-n", 4, "--per-class", 3, "--out", out, "--no-progress")
    assert "nats per image = " in r.stdout and "bits/dim" in r.stdout and "speed-up of the cached sampler" in r.stdout
    assert "agree on 100.00% of pixels" in r.stdout
    # the class grid (ten rows of --per-class digits, 8x8 drawn at 8x scale, 2-pixel gaps), its classifier
    # agreement, and the completions picture (each row: an original and four completions)
    assert Image.open(out).size == (2 + 3 * 66, 2 + 10 * 66)
    assert re.search(r"classifier agreement: \d+\.\d% of the 30 samples are labelled as the class", r.stdout)
    assert Image.open(tmp_path / "samples_completions.png").size == (2 + 5 * 66, 2 + 10 * 66)


def test_demo_trains_when_nothing_is_shipped(tmp_path):
    # only the GatedPixelCNN is shipped: --model pixelcnn trains one first (tiny here), then runs the demo on it
    out = tmp_path / "samples.png"
    r = fastar("demo", "--model", "pixelcnn", "--epochs", 1, "--limit", 64, "-n", 2, "--workdir", tmp_path / "w",
               "--out", out, "--no-progress")
    assert "training pixelcnn on mnist" in r.stdout and "speed-up of the cached sampler" in r.stdout
    assert (tmp_path / "w" / "pixelcnn_mnist" / "last.pt").exists() and out.exists()


def test_demo_shipped_checkpoint_loads():
    from fastar import checkpoint
    from fastar.checkpoints import shipped_path

    p = shipped_path("gated_pixelcnn_mnist")
    assert p is not None, "fastar/checkpoints/gated_pixelcnn_mnist.pt is missing from the package"
    assert os.path.getsize(p) < 3 * 2**20
    model, ck = checkpoint.load_model(p)
    assert ck["data"]["name"] == "mnist" and ck["data"]["shape"] == [1, 28, 28]
    assert ck["evals"][-1]["test_bpd"] < 0.2


def test_bench_saves_results_and_speedup_plot(tmp_path):
    from PIL import Image

    r = fastar("bench", "sampling", "--quick", "--device", "cpu", "--threads", "1", "--out", tmp_path)
    assert "speedup" in r.stdout
    png = tmp_path / "sampling-cpu-quick.png"
    assert (tmp_path / "sampling-cpu-quick.json").exists() and png.exists()
    assert Image.open(png).size[0] > 300


def test_bench_plot_without_batch_column_draws_bars(tmp_path):
    from fastar.bench.plot import plot_results

    rows = [{"case": "3x3", "pass": "fwd", "speedup_vs_ref": 2.5},
            {"case": "7x7", "pass": "fwd", "speedup_vs_ref": 0.8}]
    meta = {"family": "masked_conv", "device": "cpu", "machine": {"cpu": "x"}}
    (tmp_path / "m.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    assert os.path.getsize(plot_results(str(tmp_path / "m.json"))) > 1000
    (tmp_path / "n.json").write_text(json.dumps({"meta": meta, "rows": [{"case": "a", "ms": 1.0}]}))
    assert plot_results(str(tmp_path / "n.json")) is None


# ---------------------------------------------------------------------------- WaveNet (issue 4)

def _has_wavenet():
    import fastar.models

    return getattr(fastar.models, "WaveNet", None) is not None


def _has_speech():
    import importlib.util

    return importlib.util.find_spec("fastar.data.speech") is not None and os.path.isdir("/usr/share/sounds/alsa")


needs_wavenet = pytest.mark.skipif(not (_has_wavenet() and _has_speech()),
                                   reason="fastar.models.WaveNet and fastar.data.speech (issue 4) are not in this "
                                          "tree, or /usr/share/sounds/alsa is missing; these run once issue 4 lands")
WAVENET_TINY = ["--model-arg", "layers=4", "--model-arg", "stacks=1", "--model-arg", "residual_channels=8",
                "--model-arg", "dilation_channels=8", "--model-arg", "skip_channels=16"]


@pytest.fixture(scope="module")
def wavenet_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("wavenet")
    r = fastar("train", "wavenet", "--data", "speech", "--epochs", 1, "--batch-size", 2, "--segment", 1024,
               "--limit", 4, "--eval-limit", 2, "--no-progress", "--out", out, *WAVENET_TINY)
    assert "held-out" in r.stdout
    return out / "last.pt"


@needs_wavenet
def test_wavenet_train_and_sample_wav(wavenet_ckpt, tmp_path):
    import wave

    ck = torch.load(wavenet_ckpt, weights_only=True)
    assert ck["model"] == "wavenet" and ck["data"]["name"] == "speech" and ck["data"]["sample_rate"] == 16000
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    fastar("sample", wavenet_ckpt, "-n", 2, "--length", 200, "--method", "cached", "--out", a, "--no-progress")
    fastar("sample", wavenet_ckpt, "-n", 2, "--length", 200, "--method", "naive", "--out", b, "--no-progress")
    with wave.open(str(a)) as f:
        assert f.getframerate() == 16000 and f.getnframes() == 2 * 200 + 16000 // 4
    assert a.read_bytes() == b.read_bytes()  # fast (queued) and naive generation draw the same audio


@needs_wavenet
def test_wavenet_bad_arguments(wavenet_ckpt, tmp_path, capsys):
    one_line_error(fastar_inprocess(capsys, "sample", wavenet_ckpt, "--out", tmp_path / "x.png"),
                   r"holds an audio model \(wavenet\); --out must end in .wav")
    one_line_error(fastar_inprocess(capsys, "train", "gated_pixelcnn", "--data", "speech", "--out", tmp_path),
                   r"model 'gated_pixelcnn' takes image data, but data set 'speech' is audio")
    one_line_error(fastar_inprocess(capsys, "train", "wavenet", "--data", "digits", "--out", tmp_path),
                   r"model 'wavenet' takes audio data, but data set 'digits' is image")


@needs_wavenet
def test_wavenet_demo(wavenet_ckpt, tmp_path):
    r = fastar("demo", "--model", "wavenet", "--checkpoint", wavenet_ckpt, "-n", 1, "--length", 100,
               "--out", tmp_path / "demo.wav", "--no-progress")
    assert "speed-up of the fast generator" in r.stdout and (tmp_path / "demo.wav").exists()
