"""fastar.quality and the shipped models' figures: the fixed classifier, class agreement, completions,
held-out NLL in honest units, and the >= 80% class agreement the shipped MNIST model must reach."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from fastar import checkpoint, quality, registry
from fastar.checkpoints import shipped_path
from fastar.data import load_dataset
from fastar.train import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_IMAGE = registry.spec(registry.default_model()).shipped[0]   # the demo's model: the bar below is its
IMAGE_CKPTS = [c for c in registry.shipped_checkpoints()
               if registry.spec(checkpoint.load_checkpoint(shipped_path(c))["model"]).kind == "image"]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def shipped():
    return checkpoint.load_model(shipped_path(DEMO_IMAGE))


def test_classifier_is_fixed_and_ordinary(mnist):
    a = quality.train_classifier(mnist, epochs=3)
    b = quality.train_classifier(mnist, epochs=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    clf = quality.classifier_for(dict(name="mnist", levels=2, num_classes=10))
    assert clf is quality.classifier_for(dict(name="mnist", levels=2, num_classes=10))  # trained once
    assert 0.85 <= clf.accuracy <= 1.0  # an ordinary classifier: right on most real held-out digits


def test_agreement_counts_what_it_says(mnist):
    clf = quality.classifier_for(dict(name="mnist", levels=2, num_classes=10))
    a = quality.agreement(clf, mnist.test, mnist.test_labels)
    assert a["agreement"] == pytest.approx(clf.accuracy) and a["n"] == len(mnist.test)
    assert sum(a["per_class"]) / 10 == pytest.approx(a["agreement"], abs=1e-6)  # 50 per class
    wrong = (mnist.test_labels + 1) % 10
    assert quality.agreement(clf, mnist.test, wrong)["agreement"] < 0.1
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\) with C\*H\*W = 784"):
        clf.predict(torch.zeros(3, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="has no class labels"):
        quality.classifier_for(dict(name="patches", levels=256, num_classes=None))


def _tiny_conditional():
    torch.manual_seed(0)
    return registry.spec("gated_pixelcnn").cls(in_channels=1, levels=2, layers=2, channels=8, num_classes=10)


def test_class_grid_is_class_major_and_seeded():
    m = _tiny_conditional()
    info = dict(name="digits", levels=2, shape=[1, 8, 8], num_classes=10)
    x, labels = quality.class_grid(m, info, 3, seed=5)
    assert x.shape == (30, 1, 8, 8) and labels.tolist() == [k for k in range(10) for _ in range(3)]
    y, _ = quality.class_grid(m, info, 3, seed=5)
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        quality.class_grid(m, info, 0)


def test_completions_keep_the_given_half():
    ds = load_dataset("digits")
    m = _tiny_conditional()
    out = quality.completions(m, ds, conditional=True, n=10, per=2, seed=1)
    assert out.shape == (30, 1, 8, 8)
    rows = out.view(10, 3, 1, 8, 8)
    first = [int((ds.test_labels == c).nonzero()[0]) for c in range(10)]
    assert torch.equal(rows[:, 0], ds.test[first])                              # the originals
    assert torch.equal(rows[:, 1:, :, :4], rows[:, :1, :, :4].expand(10, 2, 1, 4, 8))  # top half given


@pytest.mark.parametrize("name", IMAGE_CKPTS)
def test_held_out_nll_units_agree(name):
    model, ck = checkpoint.load_model(shipped_path(name))
    ds, cond = registry.load_like(ck["data"]), registry.is_conditional(ck["model"], ck["config"], ck["data"])
    r = quality.held_out_nll(model, ds, conditional=cond)
    assert r["dims"] == math.prod(ds.shape) and r["n"] == len(ds.test)
    assert r["bits_per_dim"] == pytest.approx(r["nll_nats"] / (r["dims"] * math.log(2)), rel=1e-12)
    # the training loop's evaluation and the figure the checkpoint recorded are the same quantity
    assert evaluate(model, ds, "cpu", conditional=cond) == pytest.approx(r["bits_per_dim"], rel=1e-5)
    assert ck["evals"][-1]["test_bpd"] == pytest.approx(r["bits_per_dim"], rel=1e-4)


def _figures(text: str, bpd: float):
    """Every 'X bits/dim' near `bpd` in a text, and the nats figure that follows it as '= Y nats'."""
    found = []
    for m in re.finditer(r"(\d+\.\d+) bits/dim(?:\s+on\s+the\s+held-out\s+digits)?\**[\s(=]+(\d+\.\d+)\s+nats", text):
        if abs(float(m.group(1)) - bpd) < 5e-4:
            found.append((float(m.group(1)), float(m.group(2))))
    return found


@pytest.mark.parametrize("name", IMAGE_CKPTS)
def test_readmes_report_the_shipped_figures_in_honest_units(name):
    model, ck = checkpoint.load_model(shipped_path(name))
    ds, cond = registry.load_like(ck["data"]), registry.is_conditional(ck["model"], ck["config"], ck["data"])
    r = quality.held_out_nll(model, ds, conditional=cond)
    for doc in ("README.md", os.path.join("fastar", "checkpoints", "README.md")):
        text = open(os.path.join(ROOT, doc)).read()
        figs = _figures(text, r["bits_per_dim"])
        assert figs, f"{doc} does not state the shipped model's held-out {r['bits_per_dim']:.4f} bits/dim = nats"
        for bpd, nats in figs:
            assert nats == pytest.approx(r["nll_nats"], abs=0.06), f"{doc}: {bpd} bits/dim is not {nats} nats"


def test_shipped_model_draws_its_classes(shipped):
    """The issue's bar: >= 80% of the shipped model's class-conditional samples (20 per class, seed
    SAMPLE_SEED) are labelled as their class by the fixed classifier."""
    model, ck = shipped
    clf = quality.classifier_for(ck["data"])
    x, labels = quality.class_grid(model, ck["data"], 20)
    a = quality.agreement(clf, x, labels)
    assert a["agreement"] >= 0.80, f"class agreement {a['agreement']:.3f}, per class {a['per_class']}"


def test_quality_benchmark_rows(tmp_path):
    import fastar.bench

    assert fastar.bench.main(["quality"], out_dir=str(tmp_path), quick=True, device="cpu") == 0
    rows = {r["case"]: r for r in json.load(open(tmp_path / "quality-cpu-quick.json"))["rows"]}
    assert set(rows) == set(registry.shipped_checkpoints())
    img = rows[DEMO_IMAGE]
    assert img["samples"] == 50 and 0 <= img["agreement_pct"] <= 100 and img["chance_pct"] == 10
    assert img["bits_per_dim"] == pytest.approx(img["recorded_bits_per_dim"], rel=1e-3)
    speech = rows["wavenet_speech"]
    assert speech["uniform_bits"] == 8 and speech["bits_per_dim"] < speech["unigram_bits"] < 8
