"""``fastar compress`` / ``decompress`` / ``score`` in-process: PNG, .npy and WAV inputs round-trip to the same
values, bad files are one line and exit status 2, scores print as text, JSON and CSV."""
from __future__ import annotations

import json
import os
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from fastar import checkpoint, codec
from fastar.checkpoints import shipped_path
from fastar.commands.codec_files import write_outputs
from tests.commands.test_bad_input_cli import check_one_line


def run(capsys, *argv):
    from fastar.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    c = capsys.readouterr()
    return rc, c.out, c.err


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    from fastar.data.sets import load_dataset

    d = tmp_path_factory.mktemp("digits")
    ds = load_dataset("mnist")
    pngs = write_outputs(ds.test[:3], {"model": "pixelrnn", "data": {"levels": 2}}, str(d / "png"))
    np.save(d / "two.npy", ds.test[3:5, 0].numpy())            # (2, 28, 28): a batch of two one-channel digits
    return d, pngs, str(d / "two.npy"), ds.test[:5]


def test_compress_decompress_png_and_npy(digit_files, tmp_path, capsys):
    d, pngs, npy, x = digit_files
    out = tmp_path / "d.fz"
    rc, o, e = run(capsys, "compress", "pixelrnn_mnist", *pngs, npy, "-o", out, "--no-progress")
    assert rc == 0, e
    assert f"5 input(s) of shape [1, 28, 28] -> {out}: {os.path.getsize(out)} bytes" in o
    rc, o, e = run(capsys, "decompress", out, "-o", tmp_path / "back", "--no-progress")
    assert rc == 0, e
    assert "decoded with pixelrnn_mnist" in o
    files = sorted(os.listdir(tmp_path / "back"))
    assert files == [f"000{i}.png" for i in range(5)]
    for i, f in enumerate(files):
        a = np.asarray(Image.open(tmp_path / "back" / f))
        assert np.array_equal(a, x[i, 0].numpy() * 255)
    rc, o, e = run(capsys, "decompress", out, "-o", tmp_path / "npy", "--format", "npy", "--no-progress",
                   "--checkpoint", "pixelrnn_mnist")
    assert rc == 0, e
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "npy" / "0004.npy")), x[4])


def test_bad_files_are_one_line(digit_files, tmp_path, capsys):
    d, pngs, npy, x = digit_files
    out = tmp_path / "d.fz"
    assert run(capsys, "compress", "pixelrnn_mnist", pngs[0], "-o", out, "--class", "3", "--no-progress")[0] == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "bad.fz").write_bytes(bytes(data))
    rc, o, e = run(capsys, "decompress", tmp_path / "bad.fz", "-o", tmp_path / "x", "--checkpoint", "pixelrnn_mnist")
    check_one_line(rc, o, e, "decompress", "checksum mismatch")
    rc, o, e = run(capsys, "decompress", tmp_path / "bad.fz", "-o", tmp_path / "x")
    check_one_line(rc, o, e, "decompress", "no shipped checkpoint matches the file")
    rc, o, e = run(capsys, "decompress", out, "-o", tmp_path / "x", "--checkpoint", "gated_pixelcnn_mnist")
    check_one_line(rc, o, e, "decompress", "another model")
    (tmp_path / "cut.fz").write_bytes(out.read_bytes()[:5])
    rc, o, e = run(capsys, "decompress", tmp_path / "cut.fz", "-o", tmp_path / "x")
    check_one_line(rc, o, e, "decompress", "truncated")
    rc, o, e = run(capsys, "compress", "pixelrnn_mnist", pngs[0], "-o", out, "--class", "10")
    check_one_line(rc, o, e, "compress", "--class must lie in [0, 10)")
    Image.fromarray(np.full((28, 28), 100, np.uint8), "L").save(tmp_path / "grey.png")
    rc, o, e = run(capsys, "compress", "pixelrnn_mnist", tmp_path / "grey.png", "-o", out)
    check_one_line(rc, o, e, "compress", "--quantize rounds")
    assert run(capsys, "compress", "pixelrnn_mnist", tmp_path / "grey.png", "-o", out, "--quantize",
               "--no-progress")[0] == 0
    Image.fromarray(np.zeros((20, 28), np.uint8), "L").save(tmp_path / "small.png")
    rc, o, e = run(capsys, "compress", "pixelrnn_mnist", pngs[0], tmp_path / "small.png", "-o", out)
    check_one_line(rc, o, e, "compress", "must share one shape")


def test_score_formats(digit_files, capsys):
    d, pngs, npy, x = digit_files
    prnn = checkpoint.load_model(shipped_path("pixelrnn_mnist"))[0]
    want = codec.score(prnn, x[:3])
    rc, o, e = run(capsys, "score", "pixelrnn_mnist", *pngs, "--format", "json", "--no-progress")
    assert rc == 0, e
    rows = json.loads(o)["scores"]
    assert [r["input"] for r in rows] == pngs
    assert np.allclose([r["bits_per_dim"] for r in rows], want.numpy(), rtol=0, atol=1e-12)
    rc, o, e = run(capsys, "score", "pixelrnn_mnist", pngs[0], "--format", "csv", "--class", "0", "--no-progress")
    assert rc == 0 and o.splitlines()[0] == "input,bits_per_dim" and o.splitlines()[1].startswith(pngs[0] + ",")
    rc, o, e = run(capsys, "score", "pixelrnn_mnist", pngs[0], "--no-progress")
    assert rc == 0 and o.split()[0] == pngs[0] and abs(float(o.split()[1]) - float(want[0])) < 1e-6


def test_wav_round_trip_and_off_level_audio(tmp_path, capsys):
    from fastar.data.speech import speech_codes

    codes = speech_codes()[1][:400].to(torch.int64)
    wav = write_outputs(codes.unsqueeze(0), {"model": "wavenet", "data": {"levels": 256, "sample_rate": 16000}},
                        str(tmp_path / "in"))[0]
    out = tmp_path / "s.fz"
    rc, o, e = run(capsys, "compress", "wavenet_speech", wav, "-o", out, "--no-progress")
    assert rc == 0, e
    rc, o, e = run(capsys, "decompress", out, "-o", tmp_path / "back", "--no-progress")
    assert rc == 0, e
    assert open(tmp_path / "back" / "0000.wav", "rb").read() == open(wav, "rb").read()
    # a sine off the mu-law levels: refused unless --quantize
    t = np.arange(400) / 16000
    pcm = (np.sin(2 * np.pi * 440 * t) * 12345).astype("<i2")
    with wave.open(str(tmp_path / "sine.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    rc, o, e = run(capsys, "compress", "wavenet_speech", tmp_path / "sine.wav", "-o", out)
    check_one_line(rc, o, e, "compress", "off the model's 256 mu-law levels")


def test_rgb_png_round_trip_with_a_pixelcnnpp_checkpoint(tmp_path, capsys):
    """256-level RGB PNGs through a PixelCNN++ checkpoint (R, G, B coded one after another): the decoded PNGs
    hold the same pixels, and score prints one bits/dim per input."""
    from fastar import registry
    from fastar.data.sets import load_dataset

    cfg = dict(in_channels=3, nr_resnet=1, nr_filters=6, nr_logistic_mix=2, dropout=0.0)
    data = dict(name="patches", kind="image", levels=256, shape=[3, 5, 6], num_classes=None, sample_rate=None)
    torch.manual_seed(0)
    m = registry.build_model("pixelcnnpp", cfg)
    ck = checkpoint.save_checkpoint(tmp_path / "pp.pt", "pixelcnnpp", cfg, m, epoch=1, step=1, data=data)
    x = load_dataset("patches").test[:2, :, :5, :6].contiguous()
    pngs = write_outputs(x, {"model": "pixelcnnpp", "data": data}, str(tmp_path / "in"))
    out = tmp_path / "rgb.fz"
    rc, o, e = run(capsys, "compress", ck, *pngs, "-o", out, "--no-progress")
    assert rc == 0, e
    rc, o, e = run(capsys, "decompress", out, "-o", tmp_path / "back", "--checkpoint", ck, "--no-progress")
    assert rc == 0, e
    for i, f in enumerate(sorted(os.listdir(tmp_path / "back"))):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "back" / f)), x[i].permute(1, 2, 0).numpy())
    rc, o, e = run(capsys, "score", ck, *pngs, "--format", "json", "--no-progress")
    assert rc == 0, e
    got = [r["bits_per_dim"] for r in json.loads(o)["scores"]]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), codec.score(m.eval(), x))
