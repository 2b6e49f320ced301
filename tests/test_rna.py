"""RNA layer, conversion, path control and the paper-vs-fixed-path evaluation gap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdefense.attacks import PGD
from advdefense.data import dataset_info
from advdefense.defenses import apply_defenses, rna
from advdefense.defenses.rna import RandomNormalization, RNAState
from advdefense.errors import AdvDefenseError, ConfigError
from advdefense.evaluation.protocols import run_protocol
from advdefense.models import build_model
from advdefense.randomness import draw_groups, freeze, get_states, seeded

from .conftest import make_smallcnn, quick_train


def _rna_smallcnn(space=("bn", "in"), **kw):
    return rna.convert(make_smallcnn(seed=0), space=space, **kw)


def _resnet18():
    info = dataset_info("cifar10")
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10, in_channels=3, image_size=32,
                       mean=info.mean, std=info.std)


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# -- conversion --------------------------------------------------------------------------
def test_convert_replaces_every_batchnorm_and_keeps_shape():
    for model, x in ((make_smallcnn(), torch.rand(4, 1, 28, 28)),
                     (_resnet18(), torch.rand(2, 3, 32, 32))):
        n_bn = _count(model, nn.BatchNorm2d)
        assert n_bn > 0
        model.eval()
        shape = model(x).shape
        rna.convert(model, space=("bn", "in", "ln", "gn_4"))
        layers = rna.rna_layers(model)
        assert len(layers) == n_bn
        # the only BatchNorm2d left are the "bn" entries inside RNA layers
        assert _count(model, nn.BatchNorm2d) == n_bn
        assert all(isinstance(m, nn.BatchNorm2d) for la in layers for m in la.norms[:1])
        assert model(x).shape == shape
        assert rna.num_paths(model) == 4 ** n_bn
    assert len(rna.rna_layers(rna.convert(_resnet18()))) == 20  # the reference's count


def test_convert_copies_bn_parameters_so_the_all_bn_path_is_the_original(mnist_train):
    x, y = mnist_train
    base = quick_train(make_smallcnn(seed=3), x[:500], y[:500], epochs=1)
    ref = base(x[:64]).detach()
    converted = rna.convert(base, space="bn,in")
    with rna.set_path(converted, "bn"):
        torch.testing.assert_close(converted(x[:64]), ref)
    with rna.set_path(converted, "in"):
        assert not torch.allclose(converted(x[:64]), ref, atol=1e-3)


def test_unknown_type_and_bad_options_give_one_line_errors():
    for bad in ("bn,xx", "gn_0", "", "bn,bn"):
        with pytest.raises(AdvDefenseError) as exc:
            rna.convert(make_smallcnn(), space=bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(AdvDefenseError, match="divisible"):
        rna.convert(make_smallcnn(), space="bn,gn_5")
    with pytest.raises(AdvDefenseError, match="granularity"):
        rna.convert(make_smallcnn(), granularity="batch")
    with pytest.raises(ConfigError, match="valid: space, granularity, mixed"):
        apply_defenses(make_smallcnn(), {"rna": {"spcae": ["bn"]}}, None)
    with pytest.raises(AdvDefenseError, match="no BatchNorm2d"):
        rna.convert(make_smallcnn(norm="ln"))


def test_registry_applies_rna():
    model = apply_defenses(make_smallcnn(), {"rna": {"space": "bn,ln", "mixed": False}}, None)
    layers = rna.rna_layers(model)
    assert len(layers) == 4 and layers[0].space == ("bn", "ln")
    assert rna.num_paths(model) == 2
    assert all(la.sync_free is None for la in layers)
    forced = apply_defenses(make_smallcnn(), {"rna": {"sync_free": True}}, None)
    assert all(la.sync_free is True for la in rna.rna_layers(forced))
    with pytest.raises(ConfigError, match="sync_free"):
        apply_defenses(make_smallcnn(), {"rna": {"sync_free": "yes"}}, None)


# -- randomness ----------------------------------------------------------------------------
def test_frozen_path_is_deterministic_and_fresh_path_is_not():
    model = _rna_smallcnn().eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        with freeze(model):
            outs = [model(x) for _ in range(5)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        fresh = [model(x) for _ in range(10)]
    assert any(not torch.allclose(fresh[0], o) for o in fresh[1:])
    # the path actually differs between fresh calls, and freezing holds one
    paths = set()
    for _ in range(10):
        model(x)
        paths.add(tuple(tuple(p) for p in rna.current_path(model)))
    assert len(paths) > 1


def test_seeded_draws_are_reproducible():
    model = _rna_smallcnn().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        with seeded(7):
            a = [model(x) for _ in range(4)]
        with seeded(7):
            b = [model(x) for _ in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_draw_groups_give_different_paths_per_group():
    model = _rna_smallcnn().eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad(), draw_groups(16):
        model(x.repeat(16, 1, 1, 1))
    states = get_states(model)
    assert all(s.types.numel() == 16 for s in states)
    paths = {tuple(int(s.types[j]) for s in states) for j in range(16)}
    assert len(paths) > 1


def test_mixed_false_uses_one_type_for_the_whole_network():
    model = _rna_smallcnn(space=("bn", "in", "ln"), mixed=False).eval()
    x = torch.rand(2, 1, 28, 28)
    seen = set()
    with torch.no_grad():
        for _ in range(12):
            with draw_groups(4):
                model(x.repeat(4, 1, 1, 1))
            states = get_states(model)
            for j in range(4):
                types = {int(s.types[j]) for s in states}
                assert len(types) == 1
                seen |= types
    assert len(seen) > 1


# -- independence of the types ----------------------------------------------------------
def test_each_type_keeps_its_own_parameters_and_statistics():
    model = _rna_smallcnn(space=("bn", "in", "ln")).eval()
    layer = rna.rna_layers(model)[0]
    params = [p for m in layer.norms for p in m.parameters()]
    assert len({p.data_ptr() for p in params}) == len(params) == 6
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        with rna.set_path(model, "bn"):
            before = model(x)
        layer.norm("in").weight.add_(1.0)
        layer.norm("ln").bias.add_(1.0)
        with rna.set_path(model, "bn"):
            torch.testing.assert_close(model(x), before)
        with rna.set_path(model, "in"):
            changed = model(x)
    assert not torch.allclose(changed, before)


def test_bn_running_stats_move_only_when_bn_is_used():
    model = _rna_smallcnn().train()
    bns = [la.norm("bn") for la in rna.rna_layers(model)]
    x = torch.rand(16, 1, 28, 28)
    snapshot = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    with torch.no_grad(), rna.set_path(model, "in"):
        model(x)
    for b, (m, v) in zip(bns, snapshot, strict=True):
        assert torch.equal(b.running_mean, m) and torch.equal(b.running_var, v)
    path = ("bn", "in", "bn", "in")
    with torch.no_grad(), rna.set_path(model, path):
        model(x)
    for t, b, (m, _v) in zip(path, bns, snapshot, strict=True):
        assert torch.equal(b.running_mean, m) == (t == "in")


def test_train_mode_bn_on_a_subset_uses_the_subset_statistics():
    layer = RandomNormalization(6, ("bn", "in")).train()
    x = torch.randn(10, 6, 5, 5) * 3 + 1
    types = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    out = layer.forward_with_state(x, RNAState(types, per_sample=True))
    bn_rows, in_rows = (types == 0).nonzero().squeeze(1), (types == 1).nonzero().squeeze(1)
    fresh_bn = nn.BatchNorm2d(6).train()
    torch.testing.assert_close(out[bn_rows], fresh_bn(x[bn_rows]))
    torch.testing.assert_close(out[in_rows], layer.norm("in")(x[in_rows]))
    # running stats were updated with the BN subset only
    expected = 0.9 * torch.zeros(6) + 0.1 * x[bn_rows].mean(dim=(0, 2, 3))
    torch.testing.assert_close(layer.norm("bn").running_mean, expected)


@pytest.mark.parametrize("granularity", ["call", "sample"])
def test_batched_groups_equal_each_group_run_alone(granularity):
    model = _rna_smallcnn(space=("bn", "in", "ln"), granularity=granularity).eval()
    with torch.no_grad():  # give BN non-trivial running statistics
        for la in rna.rna_layers(model):
            la.norm("bn").running_mean.uniform_(-0.5, 0.5)
            la.norm("bn").running_var.uniform_(0.5, 2.0)
    n, k = 3, 5
    x = torch.rand(n, 1, 28, 28)
    with torch.no_grad(), draw_groups(k):
        out = model(x.repeat(k, 1, 1, 1))
    states = get_states(model)
    assert len({tuple(s.types.tolist()) for s in states}) > 1 or k == 1
    with torch.no_grad():
        for j in range(k):
            rows = slice(j * n, (j + 1) * n)
            if granularity == "call":
                path = [int(s.types[j]) for s in states]
                with rna.set_path(model, path):
                    alone = model(x)
                torch.testing.assert_close(out[rows], alone)
            else:
                for i in range(n):
                    path = [int(s.types[j * n + i]) for s in states]
                    with rna.set_path(model, path):
                        alone = model(x[i : i + 1])
                    torch.testing.assert_close(out[j * n + i], alone[0])


def test_path_helpers_and_explicit_states():
    model = _rna_smallcnn(space=("bn", "in")).eval()
    paths = rna.enumerate_paths(model, limit=None)
    assert len(paths) == rna.num_paths(model) == 16 and len(set(paths)) == 16
    assert len(rna.enumerate_paths(model, limit=3)) == 3
    x = torch.rand(4, 1, 28, 28)
    p = ("in", "bn", "bn", "in")
    with torch.no_grad():
        with rna.set_path(model, p):
            a = model(x)
            assert [c[0] for c in rna.current_path(model)] == list(p)
        with freeze(model, states=rna.path_states(model, p)):
            b = model(x)
    torch.testing.assert_close(a, b)
    with pytest.raises(AdvDefenseError, match="one type per RNA layer"):
        with rna.set_path(model, ("bn", "in")):
            pass
    g = torch.Generator().manual_seed(0)
    assert len(rna.random_path(model, generator=g)) == 4


# -- evaluation: paper protocol vs fixed-path white-box ---------------------------------------
@pytest.fixture(scope="module")
def tiny_rna(mnist_train):
    x, y = mnist_train
    with seeded(0):
        model = rna.convert(make_smallcnn(seed=0), space="bn,in")
        return quick_train(model, x[:2000], y[:2000], epochs=1)


def test_fixed_path_attack_is_at_least_as_strong_as_paper_protocol(tiny_rna, mnist_test):
    x, y = mnist_test
    x, y = x[:200], y[:200]
    attack = PGD(eps=0.1, steps=10, seed=0)
    tiny_rna.eval()
    with seeded(1):
        _, fixed = run_protocol(tiny_rna, attack, x, y, "fixed", repeats=4)
        _, paper = run_protocol(tiny_rna, attack, x, y, "paper", repeats=4)
    fixed_acc = fixed.single.float().mean().item()
    paper_acc = paper.single.float().mean().item()
    assert fixed_acc <= paper_acc, (fixed_acc, paper_acc)
    # and the gap is real: the attack on path A transfers imperfectly to fresh paths
    assert paper_acc - fixed_acc > 0.02, (fixed_acc, paper_acc)


def test_rna_report_tabulates_the_three_protocols(tiny_rna, mnist_test):
    from advdefense.analysis.rna_report import rna_report

    x, y = mnist_test
    rep = rna_report(tiny_rna, x[:16], y[:16], eps=0.1, steps=3, eot_samples=2, repeats=3,
                     attacks=("fgsm", "pgd", "cw"))
    table = rep.table()
    assert {"fgsm", "pgd", "cw"} <= set(table)
    for name in ("fgsm", "pgd", "cw"):
        assert set(table[name]) == {"paper", "fixed", "fresh"}
        for acc in table[name].values():
            assert acc.correct <= table["clean"]["-"].n
    # the worst case over a protocol is no better than any attack under it
    for p in ("paper", "fixed", "fresh"):
        assert table["worst case"][p].correct <= min(table[a][p].correct
                                                      for a in ("fgsm", "pgd", "cw"))
    md = rep.to_markdown()
    assert md.count("\n") == len(table) + 2 and "EOT over paths" in md
    assert set(rep.to_dict()["majority"]["pgd"]) == {"paper", "fixed", "fresh"}


# -- no host synchronization, dtypes, generators ----------------------------------------------
def _forbid_host_reads(monkeypatch):
    """Make every way of reading a tensor back on the host raise inside the block."""

    def boom(*_a, **_k):
        raise AssertionError("host synchronization inside an RNA forward")

    for name in ("item", "tolist", "nonzero", "cpu", "numpy", "unique", "__int__", "__float__",
                 "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch, "nonzero", boom)
    monkeypatch.setattr(torch, "unique", boom)


def _sync_free(model, value=True):
    for la in rna.rna_layers(model):
        la.sync_free = value
    return model


@pytest.mark.parametrize("granularity", ["call", "sample"])
def test_forward_and_backward_never_read_tensors_on_the_host(monkeypatch, granularity):
    """The forward that runs on CUDA (and under torch.compile), forced here on the CPU."""
    mixed = _sync_free(_rna_smallcnn(space=("bn", "in", "ln"), granularity=granularity))
    shared = _sync_free(_rna_smallcnn(space=("bn", "gn_4"), granularity=granularity,
                                      mixed=False))
    for la in rna.rna_layers(shared):
        la.norm("bn").momentum = None  # the cumulative average has its own update
    x = torch.rand(6, 1, 28, 28)
    for model in (mixed, shared):
        path = rna.path_states(model, [0, 1] * 2)
        with monkeypatch.context() as mp:
            _forbid_host_reads(mp)
            for train in (True, False):
                model.train(train)
                model(x).sum().backward()
                with draw_groups(3):
                    model(x).sum().backward()
                with freeze(model):
                    model(x)
                    model(x)
                with freeze(model, states=path):
                    model(x)
        assert model(x).shape == (6, 10)  # and outside the block, everything still works


class _Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm as CUDA autocast runs it: in float32, whatever the input dtype."""

    def forward(self, x):
        return super().forward(x.float())


@pytest.mark.parametrize("sync_free", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_types_with_different_output_dtypes_merge_under_autocast(dtype, sync_free):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = RandomNormalization(4, ("bn", "in")).train()
    layer.sync_free = sync_free
    fp32_in = _Fp32GroupNorm(4, 4)
    fp32_in.load_state_dict(layer.norms[1].state_dict())
    layer.norms[1] = fp32_in
    x = torch.rand(8, 3, 6, 6)
    for state in (RNAState(torch.tensor([0, 1]), per_sample=True),
                  RNAState(torch.tensor([0, 1])), RNAState(torch.tensor([1]))):
        with torch.autocast("cpu", dtype=dtype):
            h = conv(x)
            assert h.dtype == dtype
            out = layer.forward_with_state(h, state)
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
        out.float().sum().backward()
    # and a whole RNA network trains a step under autocast with mixed types per row
    model = _sync_free(_rna_smallcnn(space=("bn", "in", "ln"), granularity="sample"),
                       sync_free).train()
    with torch.autocast("cpu", dtype=dtype):
        logits = model(torch.rand(4, 1, 28, 28))
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("sync_free", [True, False])
def test_types_a_row_did_not_draw_get_zero_gradients(sync_free):
    model = _sync_free(_rna_smallcnn(space=("bn", "in")), sync_free).train()
    with rna.set_path(model, "bn"):
        model(torch.rand(4, 1, 28, 28)).sum().backward()
    for la in rna.rna_layers(model):
        assert la.norm("bn").weight.grad.abs().sum() > 0
        assert torch.equal(la.norm("in").weight.grad, torch.zeros(la.channels))


@pytest.mark.parametrize("sync_free", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_cumulative_bn_average_moves_only_with_use(per_sample, sync_free):
    layer = RandomNormalization(3, ("bn", "in"), momentum=None).train()
    layer.sync_free = sync_free
    bn = layer.norm("bn")
    ref = nn.BatchNorm2d(3, momentum=None).train()
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    types = torch.tensor([0, 0, 0, 0] if not per_sample else [0, 1, 0, 1])
    rows = (types == 0).nonzero().squeeze(1)
    for _ in range(2):
        layer.forward_with_state(x, RNAState(types if per_sample else types[:1], per_sample))
        ref(x[rows])
        layer.forward_with_state(x, RNAState(torch.tensor([1])))  # BN unused: no change
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 2


def test_path_generator_makes_draws_reproducible_and_independent_of_the_global_rng():
    model = _rna_smallcnn(space=("bn", "in", "ln")).eval()
    x = torch.rand(2, 1, 28, 28)
    gen = torch.Generator()
    assert rna.set_path_generator(model, gen) == 4
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # the global stream differs, the generator's does not
        gen.manual_seed(5)
        with torch.no_grad(), draw_groups(2):
            model(x.repeat(2, 1, 1, 1))
        paths.append([s.types.tolist() for s in get_states(model)])
    assert paths[0] == paths[1]
    rna.set_path_generator(model, None)
    assert all(la.generator is None for la in rna.rna_layers(model))


@pytest.mark.parametrize("granularity", ["call", "sample"])
@pytest.mark.parametrize("train", [True, False])
def test_sync_free_and_selective_forwards_agree(granularity, train):
    """The merged forward (CUDA, compile) and the drawn-types-only forward (CPU) give the same
    outputs, input and parameter gradients and BN statistics."""
    import copy

    base = _rna_smallcnn(space=("bn", "in", "ln"), granularity=granularity).train(train)
    models = [_sync_free(copy.deepcopy(base), v) for v in (True, False)]
    x = torch.rand(6, 1, 28, 28)
    results = []
    for model in models:
        xi = x.clone().requires_grad_(True)
        with seeded(3), draw_groups(3):
            out = model(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, xi.grad, [p.grad for p in model.parameters()],
                        [b.clone() for b in model.buffers()]))
    (o1, g1, p1, b1), (o2, g2, p2, b2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)
    for a, b in zip(p1, p2, strict=True):
        if b is None and not train:  # eval mode: idle types get no gradient on this path
            b = torch.zeros_like(a)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for a, b in zip(b1, b2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["in", "gn_2"])
def test_group_norm_types_keep_channels_last_and_values_on_the_cpu(kind):
    """The CPU forward sends channels_last inputs of GroupNorm types through a contiguous copy
    (a faster kernel): same output and gradient as the module on the contiguous input, and
    the output is channels_last again for the convolution that follows."""
    layer = RandomNormalization(4, ("bn", kind)).eval()
    x = torch.randn(6, 4, 5, 5)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.clone(memory_format=fmt).requires_grad_(True)
        out = layer.forward_with_state(xi, RNAState(torch.tensor([1])))
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append((out, xi.grad))
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    plain = layer.norm(kind)(x)
    torch.testing.assert_close(outs[1][0], plain)
