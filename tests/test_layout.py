"""channels_last by default (advdefense.layout): attacks and evaluations run convolutional
models in channels_last on the CPU, restore the weights' layout, and get the same results."""

from __future__ import annotations

import pytest
import torch

from advdefense import layout
from advdefense.attacks import PGD
from advdefense.evaluation.harness import AttackSpec, evaluate

from .conftest import make_smallcnn


@pytest.fixture
def contiguous_default():
    yield
    layout.set_memory_format("auto")


def conv_layouts(model):
    return [p.is_contiguous() for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]


def test_block_converts_the_conv_weights_and_restores_them():
    model = make_smallcnn()
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    assert all(conv_layouts(model))
    with layout.channels_last_weights(model):
        assert conv_layouts(model) and not any(conv_layouts(model))
        with layout.channels_last_weights(model):  # nested: nothing more to do
            assert not any(conv_layouts(model))
        assert not any(conv_layouts(model))
    assert all(conv_layouts(model))
    assert list(model.parameters()) == params  # identity kept (optimizers still see them)
    assert all(torch.equal(a, b) for a, b in zip(params, values, strict=True))


def test_modes(contiguous_default):
    model = make_smallcnn()
    assert layout.wants_channels_last(model)
    assert not layout.wants_channels_last(torch.nn.Linear(3, 2))
    layout.set_memory_format("contiguous")
    assert not layout.wants_channels_last(model)
    with layout.channels_last_weights(model):
        assert all(conv_layouts(model))
    with pytest.raises(ValueError, match="memory format"):
        layout.set_memory_format("nhwc")


def test_attacks_run_in_channels_last_and_leave_the_model_as_it_was(robust_model, mnist_test):
    x, y = mnist_test[0][:32], mnist_test[1][:32]
    seen = []
    conv = [m for m in robust_model.modules() if isinstance(m, torch.nn.Conv2d)][1]
    hook = conv.register_forward_pre_hook(
        lambda m, args: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)
                                    and not m.weight.is_contiguous()))
    try:
        x_adv = PGD(eps=0.3, steps=3, seed=0)(robust_model, x, y)
    finally:
        hook.remove()
    assert seen and all(seen)
    assert all(conv_layouts(robust_model))
    assert x_adv.is_contiguous()


def test_same_robust_accuracy_as_contiguous(robust_model, mnist_test, contiguous_default):
    x, y = mnist_test[0][:200], mnist_test[1][:200]
    specs = [AttackSpec("pgd", PGD(eps=0.3, steps=20, step_size=0.075, seed=0))]
    fast = evaluate(robust_model, (x, y), specs, seed=0, checks=False)
    layout.set_memory_format("contiguous")
    plain = evaluate(robust_model, (x, y), specs, seed=0, checks=False)
    a, b = fast.entries["pgd/fresh"].verdict.all, plain.entries["pgd/fresh"].verdict.all
    # only the convolutions' float rounding differs: at most a borderline example or two
    assert int((a != b).sum()) <= 2
    assert 0.2 < float(b.float().mean()) < 0.98  # a robust model: the comparison means something


def test_a_grey_scale_stem_runs_in_channels_last_too():
    """A weight with one input channel is contiguous in both layouts; it must still get the
    exact channels_last strides, or oneDNN runs the stem (and the layers after it up to the
    next weight) in NCHW and copies the activations back and forth."""
    model = make_smallcnn()
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.weight.shape[1] == 1
    before = stem.weight.stride()
    outputs = []
    hook = stem.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        with layout.channels_last_weights(model):
            c, h, w = stem.weight.shape[1:]
            assert stem.weight.stride() == (c * h * w, 1, w * c, c)
            model(torch.rand(4, 1, 28, 28))
    finally:
        hook.remove()
    out = outputs[0]
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert stem.weight.stride() == before  # restored to the exact contiguous strides
