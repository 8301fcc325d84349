"""The two test-only families (tests/models/toy_families.py) go through ``fastar train`` and
``fastar sample`` like any shipped family, with nothing outside their test files naming them (the
contract suite holds them too: they are registered in tests/conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastar import sampling
from fastar.checkpoint import load_checkpoint
from fastar.registry import build_model
from tests.commands.test_cli import fastar_inprocess
from tests.models.toy_families import GaussAR, JointRGB

pytestmark = pytest.mark.usefixtures("one_thread")


def _held_out_nll(ckpt_path):
    from fastar.data.sets import load_like

    ck = load_checkpoint(ckpt_path)
    model = build_model(ck["model"], ck["config"])
    ds = load_like(ck["data"])
    with torch.no_grad():
        trained = model.nll(ds.test).mean().item()
        model.load_state_dict(ck["state_dict"])
        return trained, model.nll(ds.test).mean().item(), model, ck


@pytest.mark.parametrize("name,data,ext", [("toy_joint_rgb", "toy_rgb", ".png"), ("toy_gauss_ar", "toy_gauss", ".npy")])
def test_train_and_sample_through_the_cli(capsys, tmp_path, name, data, ext):
    out = tmp_path / name
    r = fastar_inprocess(capsys, "train", name, "--data", data, "--epochs", "4", "--batch-size", "32", "--lr", "0.05",
                         "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    untrained, trained, model, ck = _held_out_nll(out / "last.pt")
    assert trained < untrained - 0.1, (untrained, trained)        # training learnt the data's structure
    path = tmp_path / f"s{ext}"
    r = fastar_inprocess(capsys, "sample", out / "last.pt", "-n", "4", "--out", path, "--no-progress")
    assert r.returncode == 0, r.stderr
    if ext == ".npy":
        x = np.load(path)
        assert x.shape == (4, 3) and np.isfinite(x).all()
    else:
        assert Image.open(path).size[0] >= 2
    # cached == naive through the public door of the trained model, from one seed (float64: real values
    # summed in another order differ in the last bits in float32)
    model = model.double()
    a = model.sample(5, generator=torch.Generator().manual_seed(0), progress=False,
                     shape=tuple(ck["data"]["shape"][1:]) if name == "toy_joint_rgb" else None)
    b = model.sample(5, generator=torch.Generator().manual_seed(0), progress=False, method="naive",
                     shape=tuple(ck["data"]["shape"][1:]) if name == "toy_joint_rgb" else None)
    assert torch.equal(a, b)


def test_vector_prefix_through_the_cli(capsys, tmp_path):
    out = tmp_path / "gauss"
    assert fastar_inprocess(capsys, "train", "toy_gauss_ar", "--data", "toy_gauss", "--epochs", "1", "--out", out,
                            "--no-progress").returncode == 0
    prefix = tmp_path / "p.npy"
    np.save(prefix, np.array([0.5, np.nan, np.nan]))
    path = tmp_path / "s.npy"
    r = fastar_inprocess(capsys, "sample", out / "last.pt", "-n", "3", "--prefix", prefix, "--out", path,
                         "--no-progress")
    assert r.returncode == 0, r.stderr
    x = np.load(path)
    assert (x[:, 0] == 0.5).all() and np.isfinite(x).all() and len(np.unique(x[:, 1])) == 3


def test_joint_step_draws_three_values_from_one_component():
    """A pixel's G depends on its R through the shared component's coefficients: the joint draw is
    what the mixture sampler gives for the whole pixel, and a step writes three slots at once."""
    torch.manual_seed(0)
    m = JointRGB(1, 3, num_mixtures=2, num_bits=3).double().eval()
    run = sampling.prepare(m, 4, (1, 3), generator=torch.Generator().manual_seed(1), record=True)
    x, params = sampling.cached_sample(m, run)
    assert run.slot_table.shape == (3, 3) and params.shape == (3, 4, 20)
    from fastar.ops import sample_discretized_mix_logistic

    for t in range(3):
        u = run.noise[t]                                                     # (N, 4): component + R, G, B
        want = sample_discretized_mix_logistic(params[t][:, :, None, None], 2, noise=u[:, :, None, None], num_bits=3)
        torch.testing.assert_close(run.step_values[:, t], want.reshape(4, 3), rtol=0, atol=0)


def test_partial_pixel_given_is_a_clear_error():
    m = JointRGB(1, 2).double()
    prefix = torch.zeros(2, 3, 1, 2, dtype=torch.int64)
    mask = torch.zeros(2, 3, 1, 2, dtype=torch.bool)
    mask[:, 0, 0, 0] = True                                                 # R of the first pixel only
    with pytest.raises(ValueError, match="jointly"):
        m.sample(2, (1, 2), prefix=prefix, mask=mask, progress=False)


def test_gauss_head_density_and_draw():
    m = GaussAR(2, 3).double()
    x = m.sample(2000, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (2000, 2) and x.dtype == torch.float64
    # the draws follow the model: their mean NLL is the model's entropy estimate, near the NLL of fresh draws
    y = m.sample(2000, generator=torch.Generator().manual_seed(1), progress=False)
    assert abs(m.nll(x).mean().item() - m.nll(y).mean().item()) < 0.15
    with pytest.raises(ValueError, match="finite"):
        m.sample(2, prefix=torch.full((2, 2), float("nan")), mask=torch.ones(2, 2, dtype=torch.bool), progress=False)
