"""The data-set table: real bundled data, fixed splits, reload from a checkpoint's record."""
from __future__ import annotations

import pytest
import torch

from fastar.data.sets import DATASETS, Dataset, load_dataset, load_like


@pytest.mark.parametrize("name,shape,levels", [("mnist", (1, 28, 28), 2), ("digits", (1, 8, 8), 2),
                                                ("patches", (3, 32, 32), 256)])
def test_datasets_are_real_and_split(name, shape, levels):
    d = load_dataset(name)
    assert d.shape == shape and d.levels == levels and d.kind == "image" == DATASETS[name].kind
    assert tuple(d.train.shape[1:]) == shape and d.train.dtype == torch.int64
    assert int(d.train.min()) == 0 and int(d.train.max()) == levels - 1
    assert abs(len(d.test) - round(0.1 * (len(d.train) + len(d.test)))) <= 5
    if d.num_classes:
        # every class in both parts, in proportion (the MNIST file is sorted by class)
        tr, te = torch.bincount(d.train_labels, minlength=d.num_classes), torch.bincount(d.test_labels,
                                                                                        minlength=d.num_classes)
        assert (te > 0).all() and (tr > 0).all()
        assert ((te.float() / (tr + te).float()) - 0.1).abs().max() < 0.02
    # the photos have texture: patches are not constant
    assert d.train.float().std() > 0.1 * (levels - 1)


def test_digits_binarisation_rule():
    from sklearn.datasets import load_digits

    from fastar.data.digits import load_digits_8x8

    raw = torch.from_numpy(load_digits().images).view(-1, 1, 8, 8)
    assert torch.equal(load_digits_8x8(2)[0], (raw >= 8).long())
    assert torch.equal(load_digits_8x8(17)[0], raw.long())
    assert int(load_digits_8x8(256)[0].max()) == 255


def test_unknown_data_set():
    with pytest.raises(ValueError, match="unknown data set 'cifar'; choose from mnist, digits, patches, speech"):
        load_dataset("cifar")


def test_table_kinds_and_old_names():
    from fastar import data, registry

    from fastar.data.kinds import KINDS

    built_in = ("mnist", "digits", "patches", "speech")
    assert {n: DATASETS[n].kind for n in built_in} == {"mnist": "image", "digits": "image", "patches": "image",
                                                      "speech": "audio"}
    assert all(s.kind in KINDS for s in DATASETS.values())    # the tests add sets of their own (toy families)
    # the loaders moved out of the registry; the old names still point at them
    assert registry.load_dataset is load_dataset and registry.Dataset is Dataset and registry.DATASETS is DATASETS
    assert data.load_dataset is load_dataset


def test_load_like_reloads_what_a_checkpoint_records():
    d = load_dataset("digits", levels=17)
    again = load_like(d.info())
    assert again.info() == d.info() and torch.equal(again.test, d.test)
    assert torch.equal(again.test_labels, d.test_labels)


def test_speech_levels_are_fixed():
    with pytest.raises(ValueError, match="mu-law coded to 256 levels"):
        load_dataset("speech", levels=16)


@pytest.mark.parametrize("name,levels", [("digits", 0), ("digits", 300), ("digits", 1), ("mnist", 257),
                                         ("patches", -4), ("digits", True), ("digits", 2.0)])
def test_levels_out_of_range(name, levels):
    # 0 silently became the default and 300 was accepted: both are refused, before any data is read
    with pytest.raises(ValueError, match=rf"--levels must be an integer in \[2, 256\] for {name}"):
        load_dataset(name, levels=levels)


@pytest.mark.parametrize("segment", [0, -1])
def test_speech_segment_must_be_positive(segment):
    with pytest.raises(ValueError, match="--segment must be a positive integer"):  # was a ZeroDivisionError
        load_dataset("speech", segment=segment)


def test_write_wav_unwritable_is_one_error(tmp_path, monkeypatch):
    """A path that cannot be opened: one OSError, and no Wave_write.__del__ error at garbage collection."""
    import gc
    import sys

    from fastar.data.audio import write_wav

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(OSError):
        write_wav(tmp_path / "no" / "such" / "x.wav", torch.zeros(10))
    gc.collect()
    assert unraisable == []
    write_wav(tmp_path / "ok.wav", torch.zeros(10))
    from fastar.data.audio import read_wav

    assert read_wav(tmp_path / "ok.wav")[0].shape == (10,)
