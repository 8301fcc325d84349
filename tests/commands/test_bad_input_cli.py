"""Bad input to the command line: every case is one line on stderr, ``fastar <command>: error: ...``,
exit status 2, no traceback (issue 12).

The table is the suite: a row is (id, argv, expected fragment of the error line). ``argv`` may name
the files of the ``files`` fixture as ``{key}`` (crafted checkpoints, a tiny image and a tiny audio
checkpoint) and ``{tmp}`` (a fresh folder per row). The next family adds rows here, and a file
kind to ``files`` when it needs one. Rows run in-process through ``fastar.cli.main``; a few run
in a real interpreter too, for what only shows at interpreter exit (the ``Wave_write.__del__``
traceback, warnings printed on stderr).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

from fastar import checkpoint, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE_CFG = dict(in_channels=1, levels=2, layers=2, channels=16, num_classes=10)
IMAGE_DATA = dict(name="digits", kind="image", levels=2, shape=[1, 8, 8], num_classes=10, sample_rate=None)
AUDIO_CFG = dict(layers=2, stacks=1, residual_channels=6, dilation_channels=6, skip_channels=16, quantization=256)
AUDIO_DATA = dict(name="speech", kind="audio", levels=256, shape=[64], num_classes=None, sample_rate=16000)
BIG = str(2**70)


def _save(path, name, cfg, data):
    torch.manual_seed(0)
    m = registry.build_model(name, cfg)
    return checkpoint.save_checkpoint(path, name, cfg, m, torch.optim.Adam(m.parameters()), epoch=1, step=1,
                                      data=data, train=dict(conditional="num_classes" in cfg))


def _crafted(src, dst, change):
    """A copy of checkpoint `src` with `change(ckpt)` applied and the checksum recomputed: what a person
    who knows the format can write, so only the checks after the checksum can catch it."""
    ck = torch.load(src, weights_only=True)
    change(ck)
    ck.pop("checksum", None)
    ck["checksum"] = checkpoint.checksum(ck)
    torch.save(ck, dst)
    return str(dst)


def _flip_tensor_bytes(src, dst, count=2000):
    """Flip `count` bytes of the weights' storage inside the file (the zip entries are stored uncompressed)."""
    raw = bytearray(open(src, "rb").read())
    ck = torch.load(src, weights_only=True)
    flipped = 0
    for t in sorted(ck["state_dict"].values(), key=lambda t: -t.numel()):
        b = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        at = raw.find(b)
        if at < 0 or len(b) < 64:
            continue
        n = min(count - flipped, len(b))
        for i in range(at, at + n):
            raw[i] ^= 0xFF
        flipped += n
        if flipped >= count:
            break
    assert flipped == count, flipped
    open(dst, "wb").write(bytes(raw))
    return str(dst)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    img = _save(d / "img.pt", "gated_pixelcnn", IMAGE_CFG, IMAGE_DATA)
    wav = _save(d / "wav.pt", "wavenet", AUDIO_CFG, AUDIO_DATA)
    f = dict(img=img, wav=wav)
    for key in ("model", "config", "data"):  # right format tag, entry missing: was a KeyError each
        ck = torch.load(img, weights_only=True)
        del ck[key]
        torch.save(ck, d / f"no_{key}.pt")
        f[f"no_{key}"] = str(d / f"no_{key}.pt")
    f["flipped"] = _flip_tensor_bytes(img, d / "flipped.pt")
    f["no_shape"] = _crafted(img, d / "no_shape.pt", lambda ck: ck["data"].pop("shape"))
    f["config_list"] = _crafted(img, d / "config_list.pt", lambda ck: ck.__setitem__("config", [1, 2]))
    f["no_rng"] = _crafted(img, d / "no_rng.pt", lambda ck: ck.pop("rng"))
    f["unknown_key"] = _crafted(img, d / "unknown_key.pt", lambda ck: ck["config"].update(dropout=0.5))
    f["str_layers"] = _crafted(img, d / "str_layers.pt", lambda ck: ck["config"].update(layers="2"))
    f["huge_int"] = _crafted(img, d / "huge_int.pt", lambda ck: ck["config"].update(layers=10**9))
    f["param_bomb"] = _crafted(img, d / "param_bomb.pt", lambda ck: ck["config"].update(layers=60, channels=60000))
    f["unknown_model"] = _crafted(img, d / "unknown_model.pt", lambda ck: ck.update(model="resnet"))
    f["huge_shape"] = _crafted(img, d / "huge_shape.pt", lambda ck: ck["data"].update(shape=[1, 10**6, 8]))
    torch.save(argparse.Namespace(a=1), d / "object.pt")
    f["object"] = str(d / "object.pt")
    open(d / "empty.pt", "wb").close()
    f["empty"] = str(d / "empty.pt")
    open(d / "text.pt", "w").write("not a checkpoint\n")
    f["text"] = str(d / "text.pt")
    os.mkfifo(d / "fifo.pt")                      # reading it would block forever
    f["fifo"] = str(d / "fifo.pt")

    def nan_weight(ck):
        name = next(k for k, v in ck["state_dict"].items() if v.is_floating_point() and k.endswith("weight"))
        ck["state_dict"][name] = ck["state_dict"][name].clone().fill_(float("nan"))
    f["nan_weights"] = _crafted(img, d / "nan_weights.pt", nan_weight)
    f["data_levels"] = _crafted(img, d / "data_levels.pt", lambda ck: ck["data"].update(levels=16))
    f["data_channels"] = _crafted(img, d / "data_channels.pt", lambda ck: ck["data"].update(shape=[3, 8, 8]))
    f["data_classes"] = _crafted(img, d / "data_classes.pt", lambda ck: ck["data"].update(num_classes=4))
    open(d / "truncated.pt", "wb").write(open(img, "rb").read()[:3000])
    f["truncated"] = str(d / "truncated.pt")
    os.makedirs(d / "run_no_config")
    torch.save(torch.load(f["no_config"], weights_only=True), d / "run_no_config" / "last.pt")
    f["run_no_config"] = str(d / "run_no_config")
    return f


TRAIN_WAVENET = ["train", "wavenet", "--data", "speech", "--out", "{tmp}/run", "--no-progress"]
TRAIN_DIGITS = ["train", "gated_pixelcnn", "--data", "digits", "--out", "{tmp}/run", "--no-progress"]
SAMPLE_IMG = ["sample", "{img}", "--out", "{tmp}/s.png", "--no-progress", "-n", "1"]
SAMPLE_WAV = ["sample", "{wav}", "--out", "{tmp}/s.wav", "--no-progress", "-n", "1", "--length", "8"]
DEMO = ["demo", "--checkpoint", "{img}", "--out", "{tmp}/d.png", "--no-progress", "-n", "1"]


def sample(ckpt, out="{tmp}/s.png"):
    return ["sample", "{" + ckpt + "}", "--out", out, "--no-progress", "-n", "1"]


ROWS = [
    # --- arguments: 0, negative and overflowing values were accepted silently or failed obscurely
    ("train-segment-0", TRAIN_WAVENET + ["--segment", "0"], "argument --segment: must be a positive integer, got 0"),
    ("train-segment-neg", TRAIN_WAVENET + ["--segment", "-3"], "argument --segment: must be a positive integer"),
    ("train-limit-0", TRAIN_DIGITS + ["--limit", "0"], "argument --limit: must be a positive integer, got 0"),
    ("train-limit-neg", TRAIN_DIGITS + ["--limit", "-5"], "argument --limit: must be a positive integer, got -5"),
    ("train-eval-limit-0", TRAIN_DIGITS + ["--eval-limit", "0"], "argument --eval-limit: must be a positive"),
    ("train-epochs-0", TRAIN_DIGITS + ["--epochs", "0"], "argument --epochs: must be a positive integer"),
    ("train-batch-0", TRAIN_DIGITS + ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    ("train-threads-0", TRAIN_DIGITS + ["--threads", "0"], "argument --threads: must be a positive integer"),
    ("train-levels-0", TRAIN_DIGITS + ["--levels", "0"], "--levels must be an integer in [2, 256] for digits"),
    ("train-levels-300", TRAIN_DIGITS + ["--levels", "300"], "--levels must be an integer in [2, 256] for digits"),
    ("train-levels-1-mnist", ["train", "pixelcnn", "--data", "mnist", "--out", "{tmp}/r", "--levels", "1"],
     "--levels must be an integer in [2, 256] for mnist, got 1"),
    ("train-levels-300-patches", ["train", "pixelcnn", "--data", "patches", "--out", "{tmp}/r", "--levels", "300"],
     "for patches, got 300"),
    ("train-levels-speech", TRAIN_WAVENET + ["--levels", "16"], "mu-law coded to 256 levels"),
    ("train-seed-2**70", TRAIN_DIGITS + ["--seed", BIG], "argument --seed: must lie in [0, 2**63 - 1]"),
    ("train-seed-neg", TRAIN_DIGITS + ["--seed", "-1"], "argument --seed: must lie in [0, 2**63 - 1], got -1"),
    ("train-lr-nan", TRAIN_DIGITS + ["--lr", "nan"], "lr must be a positive number"),
    # --- --model-arg: the config is validated against the constructor before anything is built
    ("train-model-arg-unknown", TRAIN_DIGITS + ["--model-arg", "lyers=2"], "no constructor argument 'lyers'"),
    ("train-model-arg-float", TRAIN_DIGITS + ["--model-arg", "layers=2.5"], "layers=2.5: expected int, got float"),
    ("train-model-arg-bool", TRAIN_DIGITS + ["--model-arg", "layers=true"], "layers=True: expected int, got bool"),
    ("train-model-arg-none", TRAIN_DIGITS + ["--model-arg", "layers=none"], "layers=None: layers needs a value"),
    ("train-model-arg-huge", TRAIN_DIGITS + ["--model-arg", "channels=100000"], "integers must lie in [0, 65536]"),
    ("train-model-arg-negative", TRAIN_DIGITS + ["--model-arg", "layers=-1"], "integers must lie in [0, 65536]"),
    ("train-model-arg-params", TRAIN_DIGITS + ["--model-arg", "layers=50", "--model-arg", "channels=4000"],
     "more than 1,000,000,000 parameters"),
    ("train-model-arg-syntax", TRAIN_DIGITS + ["--model-arg", "layers"], "--model-arg takes KEY=VALUE"),
    # --- sample and demo arguments
    ("sample-length-0", SAMPLE_WAV + ["--length", "0"], "argument --length: must be a positive integer, got 0"),
    ("sample-length-neg", SAMPLE_WAV + ["--length", "-4"], "argument --length: must be a positive integer"),
    ("sample-length-image", SAMPLE_IMG + ["--length", "10"], "--length applies to audio models"),
    ("sample-seed-2**70", SAMPLE_IMG + ["--seed", BIG], "argument --seed: must lie in [0, 2**63 - 1]"),
    ("sample-n-0", SAMPLE_IMG + ["-n", "0"], "argument -n: must be a positive integer, got 0"),
    ("sample-temperature-nan", SAMPLE_IMG + ["--temperature", "nan"], "argument --temperature: must be a finite"),
    ("sample-temperature-neg", SAMPLE_IMG + ["--temperature", "-1"], "argument --temperature: must be a finite"),
    ("sample-int-x", SAMPLE_IMG + ["-n", "x"], "argument -n: invalid int value: 'x'"),
    ("sample-wav-unwritable", SAMPLE_WAV[:3] + ["/proc/fastar-no/s.wav"] + SAMPLE_WAV[4:], "cannot write /proc/"),
    ("sample-png-unwritable", SAMPLE_IMG[:3] + ["/proc/fastar-no/s.png"] + SAMPLE_IMG[4:], "cannot write /proc/"),
    ("demo-limit-0", DEMO + ["--limit", "0"], "argument --limit: must be a positive integer, got 0"),
    ("demo-seed-2**70", DEMO + ["--seed", BIG], "argument --seed: must lie in [0, 2**63 - 1]"),
    ("demo-n-0", DEMO + ["-n", "0"], "argument -n: must be a positive integer"),
    ("demo-length-0", DEMO + ["--length", "0"], "argument --length: must be a positive integer"),
    ("bench-threads-0", ["bench", "--threads", "0"], "argument --threads: must be a positive integer"),
    # --- checkpoints: missing entries (a KeyError each before), damage, crafted content, foreign files
    ("ckpt-no-model", sample("no_model"), "is a damaged fastar checkpoint: no 'model' entry"),
    ("ckpt-no-config", sample("no_config"), "is a damaged fastar checkpoint: no 'config' entry"),
    ("ckpt-no-data", sample("no_data"), "is a damaged fastar checkpoint: no 'data' entry"),
    ("ckpt-no-data-shape", sample("no_shape"), "the checkpoint records no data 'shape'"),
    ("ckpt-config-list", sample("config_list"), "'config' is a list, not a dict"),
    ("ckpt-no-rng", sample("no_rng"), "no 'rng' entry"),
    ("ckpt-flipped-bytes", sample("flipped"), "does not match the checksum stored when it was written"),
    ("ckpt-flipped-bytes-demo", ["demo", "--checkpoint", "{flipped}", "--out", "{tmp}/d.png"], "checksum"),
    ("ckpt-unknown-config-key", sample("unknown_key"), "has no constructor argument 'dropout'"),
    ("ckpt-config-str", sample("str_layers"), "layers='2': expected int, got str"),
    ("ckpt-config-huge-int", sample("huge_int"), "integers must lie in [0, 65536]"),
    ("ckpt-config-param-bomb", sample("param_bomb"), "more than 1,000,000,000 parameters"),
    ("ckpt-unknown-model", sample("unknown_model"), "model 'resnet', which this fastar does not have"),
    ("ckpt-huge-shape", sample("huge_shape"), "make no data set"),
    ("ckpt-python-object", sample("object"), "holds a Python object of type argparse.Namespace"),
    ("ckpt-empty", sample("empty"), "is not a readable fastar checkpoint: the file is empty"),
    ("ckpt-text", sample("text"), "is not a readable fastar checkpoint: not a file written by torch.save"),
    ("ckpt-truncated", sample("truncated"), "not a readable fastar checkpoint: its archive is damaged"),
    ("ckpt-fifo", sample("fifo"), "is not a regular file"),
    ("ckpt-fifo-demo", ["demo", "--checkpoint", "{fifo}", "--out", "{tmp}/d.png"], "is not a regular file"),
    ("ckpt-nan-weights", sample("nan_weights"), "holds non-finite weights"),
    ("ckpt-data-levels", sample("data_levels"), "data entry contradicts its model config (levels 2 vs data levels 16)"),
    ("ckpt-data-channels", sample("data_channels"), "in_channels 1 vs data shape [3, 8, 8]"),
    ("ckpt-data-classes", sample("data_classes"), "num_classes 10 vs data num_classes 4"),
    ("train-lr-1e10", ["train", "pixelrnn", "--data", "digits", "--out", "{tmp}/run", "--no-progress", "--lr", "1e10",
                       "--batch-size", "8", "--limit", "64", "--model-arg", "layers=1", "--model-arg", "hidden=4"],
     "diverged"),
    ("train-num-classes-without-conditional", TRAIN_DIGITS + ["--model-arg", "num_classes=5"], "add --conditional"),
    ("train-num-classes-contradicts-data", TRAIN_DIGITS + ["--conditional", "--model-arg", "num_classes=5"],
     "digits has 10 classes"),
    ("check-device", ["check", "--device", "tpu"], "device must be 'cpu', 'cuda'"),
    ("ckpt-resume-no-config", ["train", "gated_pixelcnn", "--data", "digits", "--out", "{run_no_config}",
                               "--resume", "--no-progress"], "no 'config' entry"),
    # --- the codec's commands: missing and foreign inputs, foreign and empty compressed files
    ("compress-missing-input", ["compress", "{img}", "{tmp}/none.png", "-o", "{tmp}/c.fz", "--no-progress"],
     "input not found: "),
    ("compress-text-input", ["compress", "{img}", "{text}", "-o", "{tmp}/c.fz", "--no-progress"],
     "a model of image data reads .png or .npy inputs"),
    ("compress-missing-npy-audio", ["compress", "{wav}", "{tmp}/none.npy", "-o", "{tmp}/c.fz"], "input not found"),
    ("decompress-foreign", ["decompress", "{text}", "-o", "{tmp}/d", "--no-progress"], "not a fastar codec file"),
    ("decompress-empty", ["decompress", "{empty}", "-o", "{tmp}/d", "--no-progress"], "truncated"),
    ("score-missing-input", ["score", "{img}", "{tmp}/none.png", "--no-progress"], "input not found: "),
]


def _argv(row_argv, files, tmp):
    return [a.format(tmp=tmp, **files) for a in row_argv]


def check_one_line(rc, out, err, command, fragment):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err + out, err
    assert "weights_only" not in err, err  # never point a user at the unsafe loader option
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastar {command}: error: "), lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv,fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_one_line(argv, fragment, files, tmp_path, capsys, monkeypatch):
    from fastar.cli import main

    monkeypatch.delenv("FASTAR_DEBUG", raising=False)
    argv = _argv(argv, files, tmp_path)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    c = capsys.readouterr()
    check_one_line(rc, c.out, c.err, argv[0], fragment)


# A real interpreter for what only shows at exit or garbage collection, or on stderr through warnings.
SUBPROCESS = ["sample-wav-unwritable", "ckpt-python-object", "ckpt-flipped-bytes", "train-segment-0", "ckpt-fifo"]


@pytest.mark.parametrize("row", SUBPROCESS)
def test_bad_input_one_line_in_a_process(row, files, tmp_path):
    argv, fragment = {r[0]: r[1:] for r in ROWS}[row]
    argv = _argv(argv, files, tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("FASTAR_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "fastar", *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    check_one_line(r.returncode, r.stdout, r.stderr, argv[0], fragment)
    assert "__del__" not in r.stderr and "Exception ignored" not in r.stderr


def test_table_covers_every_command():
    """Each command that takes input has rows: a new command should get its rows too."""
    from fastar.commands import COMMANDS

    covered = {r[1][0] for r in ROWS}
    assert {c.NAME for c in COMMANDS} - {"info"} <= covered


def test_valid_input_still_runs(files, tmp_path, capsys):
    """The checks refuse only bad input: the same tiny checkpoints sample fine."""
    from fastar.cli import main

    assert main(_argv(SAMPLE_IMG + ["--seed", str(2**63 - 1)], files, tmp_path)) == 0
    assert main(_argv(SAMPLE_WAV, files, tmp_path)) == 0
    assert re.search(r"1 clip\(s\) of 8 samples", capsys.readouterr().out)
