"""The model table is the specs: names, defaults, compatibility and conditioning come from them."""
from __future__ import annotations

import pytest

from fastar import registry
from fastar.models import SPECS


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        registry.canonical_model("resnet")
    assert registry.canonical_model("GatedPixelCNN") == "gated_pixelcnn"
    assert registry.canonical_model("gated-pixelcnn") == "gated_pixelcnn"
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        registry.load_dataset("cifar")
    with pytest.raises(ValueError, match="takes image data"):
        registry.default_config("gated_pixelcnn", registry.Dataset("speech", "audio", 256, (16,), None, None))


def test_every_spec_is_in_the_table():
    for name, spec in SPECS.items():
        assert registry.canonical_model(name) == name
        assert registry.canonical_model(spec.cls.__name__) == name
        assert registry.model_class(name) is spec.cls and registry.model_kind(name) == spec.kind
        for d in spec.datasets:
            assert name in registry.models_for(d)


def test_wrong_kind_names_the_models_that_fit():
    audio = [k for k, s in SPECS.items() if s.kind == "audio" and "speech" in s.datasets]
    image = [k for k, s in SPECS.items() if s.kind == "image" and "digits" in s.datasets]
    with pytest.raises(ValueError, match=f"use {' or '.join(audio)} with --data speech"):
        registry.check_compatible(image[0], dict(name="speech", kind="audio"))
    with pytest.raises(ValueError, match=f"use {' or '.join(image)} with --data digits"):
        registry.check_compatible(audio[0], dict(name="digits", kind="image"))


def test_default_model_is_the_shipping_image_spec_of_highest_priority():
    shipping = [s for s in SPECS.values() if s.kind == "image" and s.shipped]
    top = max(s.demo_priority for s in shipping)
    assert registry.default_model() == next(s.name for s in shipping if s.demo_priority == top)
    assert registry.shipped_checkpoints() == [c for s in SPECS.values() for c in s.shipped]


def test_conditioning_comes_from_the_spec():
    digits = registry.load_dataset("digits").info()
    patches = registry.load_dataset("patches").info()
    for name, spec in SPECS.items():
        over = registry.conditional_config(name, digits)
        assert over == spec.conditional_config(digits)
        if over:
            cfg = dict(registry.default_config(name, digits), **over)
            assert registry.is_conditional(name, cfg, digits)
            assert not registry.is_conditional(name, registry.default_config(name, digits), digits)
        if spec.kind == "image":  # no labels, no conditioning
            assert registry.conditional_config(name, patches) is None
