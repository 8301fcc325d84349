"""Training loop: exact resume, NaN stop with the last good checkpoint kept, atomic checkpoints, data sets."""
from __future__ import annotations

import os

import pytest
import torch

from fastar import checkpoint, registry
from fastar.train import TrainingDiverged, train

TINY = dict(layers=2, channels=8)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # also makes CPU float sums reproducible run to run
    yield
    torch.set_num_threads(n)


def _run(out, epochs, **kw):
    args = dict(model="gated_pixelcnn", data="digits", batch_size=16, lr=3e-3, out=str(out), config=TINY,
                limit=64, eval_limit=32, progress=False, log=lambda *a: None, seed=3)
    args.update(kw)
    return train(epochs=epochs, **args)


def test_resume_reproduces_uninterrupted_loss_curve(tmp_path):
    full = _run(tmp_path / "full", 3)
    part = _run(tmp_path / "part", 1)
    assert len(part["history"]) == 4
    resumed = _run(tmp_path / "part", 3, resume=True)
    assert len(full["history"]) == 12
    assert resumed["history"] == full["history"]  # bit for bit, every step
    a = checkpoint.load_checkpoint(tmp_path / "full" / "last.pt")
    b = checkpoint.load_checkpoint(tmp_path / "part" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 12
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert [e["test_bpd"] for e in a["evals"]] == [e["test_bpd"] for e in b["evals"]]


def test_without_resume_an_existing_checkpoint_is_not_overwritten(tmp_path):
    _run(tmp_path, 1)
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        _run(tmp_path, 1)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    _run(tmp_path, 1, model="pixelcnn")
    with pytest.raises(ValueError, match="checkpoint of model 'pixelcnn', not 'gated_pixelcnn'"):
        _run(tmp_path, 2, resume=True)


def test_nan_loss_stops_at_the_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 6 \(epoch 2\).*last good checkpoint is kept"):
        _run(tmp_path, 3, _nan_at_step=6)
    ck = checkpoint.load_checkpoint(tmp_path / "last.pt")
    assert ck["epoch"] == 1 and ck["step"] == 4 and len(ck["history"]) == 4
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    # the kept checkpoint resumes cleanly
    r = _run(tmp_path, 2, resume=True)
    assert r["step"] == 8


def test_nan_loss_from_a_real_blow_up(tmp_path):
    # a huge learning rate makes the weights overflow within a few steps: the stop is real, not injected
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        _run(tmp_path, 20, lr=1e30)


def test_atomic_save_leaves_old_file_when_write_fails(tmp_path, monkeypatch):
    m = registry.build_model("gated_pixelcnn", dict(in_channels=1, levels=2, **TINY))
    p = checkpoint.save_checkpoint(tmp_path / "last.pt", "gated_pixelcnn", dict(in_channels=1, levels=2, **TINY), m,
                                   epoch=1)
    before = open(p, "rb").read()

    def boom(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(p, "gated_pixelcnn", {}, m, epoch=2)
    assert open(p, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(p)["epoch"] == 1


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a fastar checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "bare.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable fastar checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")


def test_model_rebuilt_from_config_gives_same_likelihood(tmp_path):
    r = _run(tmp_path, 1, conditional=True)
    model, ck = checkpoint.load_model(tmp_path / "last.pt")
    assert ck["config"]["num_classes"] == 10
    x, y = registry.load_dataset("digits").test[:8], registry.load_dataset("digits").test_labels[:8]
    r["model"].eval()
    torch.testing.assert_close(model.nll(x, y), r["model"].nll(x, y))


def test_amp_bfloat16_trains(tmp_path):
    r = _run(tmp_path, 1, amp=True)
    assert all(torch.isfinite(torch.tensor(r["history"])))
