"""Checkpoints you can trust (issue 12): checksums, stale temporaries, config validation before building."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from fastar import checkpoint, registry

CFG = dict(in_channels=1, levels=2, layers=2, channels=8)
DATA = dict(name="digits", kind="image", levels=2, shape=[1, 8, 8], num_classes=10, sample_rate=None)


def _save(path):
    m = registry.build_model("gated_pixelcnn", CFG)
    opt = torch.optim.Adam(m.parameters())
    m.nll(torch.zeros(2, 1, 8, 8, dtype=torch.int64)).mean().backward()
    opt.step()  # an optimizer state with tensors in it, so the checksum covers those too
    return checkpoint.save_checkpoint(path, "gated_pixelcnn", CFG, m, opt, epoch=1, step=1, data=DATA)


# ---------------------------------------------------------------------------- checksums

def test_checksum_written_and_verified(tmp_path):
    p = _save(tmp_path / "last.pt")
    ck = torch.load(p, weights_only=True)
    assert ck["checksum"].startswith("sha256:") and ck["checksum"] == checkpoint.checksum(ck)
    checkpoint.load_model(p)  # verifies


@pytest.mark.parametrize("change", [
    lambda ck: ck["state_dict"][next(iter(ck["state_dict"]))].view(-1)[0].add_(1e-3),
    lambda ck: ck["config"].update(layers=3),
    lambda ck: ck["data"].update(levels=3),
    lambda ck: next(iter(ck["optimizer"]["state"].values()))["exp_avg"].view(-1)[0].mul_(2),
    lambda ck: ck["history"].append(1.0),
], ids=["weights", "config", "data", "optimizer", "history"])
def test_any_change_breaks_the_checksum(tmp_path, change):
    p = _save(tmp_path / "last.pt")
    ck = torch.load(p, weights_only=True)
    change(ck)
    torch.save(ck, p)
    with pytest.raises(ValueError, match="does not match the checksum"):
        checkpoint.load_checkpoint(p)


def test_checksum_is_stable_across_dict_order(tmp_path):
    ck = torch.load(_save(tmp_path / "last.pt"), weights_only=True)
    again = {k: ck[k] for k in reversed(list(ck))}
    again["config"] = {k: ck["config"][k] for k in reversed(list(ck["config"]))}
    assert checkpoint.checksum(again) == ck["checksum"]


@pytest.mark.parametrize("name", ["gated_pixelcnn_mnist", "wavenet_speech"])
def test_checkpoints_written_before_checksums_load_unverified(name, tmp_path):
    import torch

    from fastar.checkpoints import shipped_path

    p = shipped_path(name)
    if p is None:
        pytest.skip(f"{name} not in this install")
    raw = torch.load(p, weights_only=True)
    raw.pop("checksum")
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    ck = checkpoint.load_checkpoint(str(old))
    assert "checksum" not in ck
    checkpoint.load_model(ck)


# ---------------------------------------------------------------------------- stale temporaries

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tmp(folder, name, age):
    f = folder / name
    f.write_bytes(b"half a checkpoint")
    t = time.time() - age
    os.utime(f, (t, t))
    return f


def test_stale_temporaries_cleaned_on_save_and_load(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = _tmp(tmp_path, f".last.pt.{dead}.abc_123.tmp", 120)
    legacy_stale = _tmp(tmp_path, ".last.pt.k2j4h_x.tmp", 7200)
    keep = [
        _tmp(tmp_path, f".last.pt.{dead}.fresh1.tmp", 5),        # recent: may still be being written
        _tmp(tmp_path, f".last.pt.{alive}.livepid.tmp", 7200),   # its writer is alive: never ours to delete
        _tmp(tmp_path, ".last.pt.legacy1.tmp", 600),            # no pid, not yet an hour old
        _tmp(tmp_path, f".other.pt.{dead}.abc.tmp", 7200),       # another checkpoint's temporary
        _tmp(tmp_path, f".last.pt.{dead}.abc.tmp.bak", 7200),    # not our naming
        _tmp(tmp_path, f"last.pt.{dead}.abc.tmp", 7200),         # not our naming (no dot in front)
    ]
    _save(tmp_path / "last.pt")
    assert not stale.exists() and not legacy_stale.exists()
    assert all(f.exists() for f in keep)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".last.pt.") and n.endswith(".tmp")
                and ("fresh1" not in n and "livepid" not in n and "legacy1" not in n)]
    again = _tmp(tmp_path, f".last.pt.{dead}.again.tmp", 120)
    checkpoint.load_checkpoint(tmp_path / "last.pt")
    assert not again.exists() and all(f.exists() for f in keep)


def test_kill_during_write_leaves_a_temporary_the_next_save_removes(tmp_path):
    """A writer killed mid-save: its temporary stays until the next save of that checkpoint."""
    code = ("import os, torch, fastar.checkpoint as c\n"
            "def die(*a, **k): os._exit(9)\n"
            "torch.save = die\n"
            f"c.atomic_save({{'x': 1}}, {str(tmp_path / 'last.pt')!r})\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
               + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env)
    assert r.returncode == 9
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".last.pt.")
    t = time.time() - 2 * checkpoint.STALE_SECONDS
    os.utime(tmp_path / left[0], (t, t))
    _save(tmp_path / "last.pt")
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


# ---------------------------------------------------------------------------- config validation

def test_every_registered_model_builds_on_meta():
    """The parameter-count bound builds on the meta device: that must work for every family."""
    for name, spec in registry.specs().items():
        for t in spec.tiny:
            with torch.device("meta"):
                m = spec.cls(**t["config"])
            assert all(p.device.type == "meta" for p in m.parameters()), name


def test_size_check_consumes_no_random_numbers():
    """Valid configs build exactly as before: the meta build draws nothing from the seeded generator."""
    for name, spec in registry.specs().items():
        cfg = spec.tiny[0]["config"]
        torch.manual_seed(7)
        a = registry.build_model(name, cfg).state_dict()
        torch.manual_seed(7)
        b = spec.cls(**cfg).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("name", list(registry.specs()))
def test_absurd_configs_refused_before_building(name):
    spec = registry.spec(name)
    cfg = dict(spec.tiny[0]["config"])
    with pytest.raises(ValueError, match="no constructor argument 'no_such_arg'"):
        registry.build_model(name, dict(cfg, no_such_arg=1))
    int_keys = [k for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)]
    with pytest.raises(ValueError, match="expected int"):
        registry.build_model(name, dict(cfg, **{int_keys[0]: "3"}))
    with pytest.raises(ValueError, match=r"integers must lie in"):
        registry.build_model(name, dict(cfg, **{int_keys[0]: 10**12}))
    sizes = {k: 4096 for k in ("layers", "channels", "residual_channels", "dilation_channels", "skip_channels",
                               "height", "width", "hidden", "features", "in_features", "num_mixtures", "nr_filters", "n_blocks")
             if k in cfg}
    if "in_features" in cfg:    # the fully-visible models: 4096 inputs and units are a fair 33M-parameter NADE
        sizes.update({k: 65536 for k in ("in_features", "hidden", "hidden_sizes") if k in cfg})
    assert sizes, f"{name}: name its size arguments here"
    t = time.perf_counter()
    with pytest.raises(ValueError, match="more than 1,000,000,000 parameters"):  # within the per-value bounds
        registry.build_model(name, dict(cfg, **sizes))
    assert time.perf_counter() - t < 20  # the hooks stop the meta build as soon as a bound is crossed


def test_shipped_checkpoints_carry_a_verified_checksum():
    import torch

    from fastar import checkpoint as _ck
    from fastar.checkpoints import SHIPPED, shipped_path

    assert SHIPPED
    for name in SHIPPED:
        path = shipped_path(name)
        assert path, name
        raw = torch.load(path, weights_only=True)
        assert "checksum" in raw and raw["checksum"] == _ck.checksum(raw), name
        _ck.load_checkpoint(path)


# ---------------------------------------------------------------------------- export for shipping

def test_export_drops_the_optimizer_and_keeps_everything_else(tmp_path):
    src = _save(tmp_path / "last.pt")
    dst = checkpoint.export_checkpoint(src, str(tmp_path / "ship.pt"))
    a, b = checkpoint.load_checkpoint(src), checkpoint.load_checkpoint(dst)  # both verify
    assert b["optimizer"] is None and a["optimizer"] is not None
    for k in ("model", "config", "epoch", "step", "data", "train", "history", "evals"):
        assert a[k] == b[k]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert os.path.getsize(dst) < os.path.getsize(src)
    m1, _ = checkpoint.load_model(src)
    m2, _ = checkpoint.load_model(dst)
    x = torch.randint(0, 2, (3, 1, 8, 8))
    assert torch.equal(m1.nll(x), m2.nll(x))
    with open(src, "r+b") as f:  # a damaged source is refused, not exported
        f.seek(os.path.getsize(src) // 2)
        f.write(b"\x00" * 64)
    with pytest.raises(ValueError):
        checkpoint.export_checkpoint(src, str(tmp_path / "bad.pt"))
    assert not os.path.exists(tmp_path / "bad.pt")
