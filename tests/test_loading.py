"""advdefense.loading: anyone's model (factories, state dicts, RobustBench, TorchScript,
torch.export), with one clear error line for each kind of bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advdefense.errors import AdvDefenseError, CheckpointError
from advdefense.loading import (
    NormalizedModel,
    check_logits,
    default_device,
    load_model,
    open_model,
    read_state_dict,
    resolve_device,
    robustbench_state_dict,
)

DATA = Path(__file__).parent / "data"

# ---------------------------------------------------------------------------------------------
# RobustBench's parameter layout, restated here independently (their TRADES-style WideResNet:
# conv1, blockB.layer.J.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc; their ResNet: conv1, bn1,
# layerL.J.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear), so the mapping is checked
# against a forward pass written without our model code.


class _RBUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.same = cin == cout
        if not self.same:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        skip = x if self.same else self.convShortcut(a)
        return skip + self.conv2(F.relu(self.bn2(self.conv1(a))))


class _RBGroup(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_RBUnit(cin if i == 0 else cout, cout, stride if i == 0
                                             else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RBWideResNet(nn.Module):
    def __init__(self, depth=10, widen=1, classes=10, bias_last=True):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = _RBGroup(n, c[0], c[1], 1)
        self.sub_block1 = _RBGroup(n, c[0], c[1], 1)  # some of their checkpoints carry it
        self.block2 = _RBGroup(n, c[1], c[2], 2)
        self.block3 = _RBGroup(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], classes, bias=bias_last)

    def forward(self, x):
        o = F.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.avg_pool2d(o, 8).flatten(1))


class _RBBasic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RBResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, w in enumerate((64, 128, 256, 512)):
            blocks = [_RBBasic(cin, w, 1 if i == 0 else 2), _RBBasic(w, w, 1)]
            cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def test_robustbench_wrn_checkpoint_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    rb = _randomize_bn(RBWideResNet(depth=10, widen=2))
    state = {f"module.{k}": v for k, v in rb.state_dict().items()}  # DataParallel prefix
    path = tmp_path / "rb_wrn.pt"
    torch.save({"state_dict": state, "epoch": 100}, path)
    ours = load_model("robustbench:wrn-10-2", weights=path)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(ours(x), rb(x), atol=1e-5)
    # RobustBench CIFAR models take [0, 1] inputs without normalization
    assert torch.equal(ours.normalize.mean.flatten(), torch.zeros(3))
    assert torch.equal(ours.normalize.std.flatten(), torch.ones(3))


def test_robustbench_mu_sigma_model_state_dict_and_no_fc_bias(tmp_path):
    torch.manual_seed(0)
    rb = _randomize_bn(RBWideResNet(depth=10, widen=1, classes=100, bias_last=False))
    mu, sigma = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    state = {**rb.state_dict(), "mu": mu.view(1, 3, 1, 1), "sigma": sigma.view(1, 3, 1, 1)}
    torch.save({"model_state_dict": state}, tmp_path / "rb.pt")
    ours = load_model("robustbench:WideResNet-10-1", weights=tmp_path / "rb.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ours(x), rb((x - mu.view(1, 3, 1, 1)) / sigma.view(1, 3, 1, 1)),
                          atol=1e-5)
    assert ours.linear.out_features == 100  # the class count comes from the weights


def test_robustbench_resnet18_checkpoint(tmp_path):
    torch.manual_seed(0)
    rb = _randomize_bn(RBResNet18())
    torch.save(rb.state_dict(), tmp_path / "rn18.pt")
    ours = load_model("robustbench:resnet-18", weights=tmp_path / "rn18.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ours(x), rb(x), atol=1e-4)


@pytest.mark.parametrize("depth,widen", [(28, 10), (34, 10)])
def test_robustbench_paper_sized_wrn_keys_map_exactly(depth, widen):
    """Full-size WRN-28-10 / WRN-34-10: every RobustBench name maps to one of ours with the
    same shape (built on the meta device: no memory, no forward)."""
    from advdefense.models import WideResNet

    with torch.device("meta"):
        rb = RBWideResNet(depth=depth, widen=widen)
        ours = WideResNet(depth=depth, width=widen, mean=(0.0,) * 3, std=(1.0,) * 3)
    mapped = robustbench_state_dict(rb.state_dict(), f"wrn-{depth}-{widen}")
    own = ours.state_dict()
    assert set(mapped) == set(own) - {"normalize.mean", "normalize.std"}
    assert all(mapped[k].shape == own[k].shape for k in mapped)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


NET = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes=10, width=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
    """


def test_factory_from_py_file_and_module_with_nested_prefixed_weights(tmp_path, monkeypatch):
    _write(tmp_path, "user_net.py", NET)
    path = _write(tmp_path, "wrapper.py", """
        from user_net import Net  # a neighbour of the file

        def build(width=4):
            return Net(width=width)
        """)
    torch.manual_seed(0)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_net

    ref = user_net.Net(width=3).eval()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in ref.state_dict().items()},
                "optimizer": {}}, tmp_path / "w.pt")
    x = torch.rand(2, 1, 8, 8)
    for spec in (f"{path}:build", "wrapper:build"):
        model = load_model(spec, weights=tmp_path / "w.pt", model_args={"width": 3})
        assert not model.training and torch.allclose(model(x), ref(x))
    # mean/std: normalization in front, inputs stay in [0, 1]
    model = load_model("user_net:Net", weights=tmp_path / "w.pt", model_args={"width": 3},
                       mean=[0.5], std=[0.25])
    assert isinstance(model, NormalizedModel)
    assert torch.allclose(model(x), ref((x - 0.5) / 0.25))


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                         nn.Linear(2 * 6 * 6, 5)).eval()


def _check_archive(loaded, kind, net):
    assert loaded.kind == kind
    model = loaded.model
    model.train()  # only flags for exported graphs, never an error
    model.eval()
    xr = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = model(xr)
    assert torch.allclose(out, net(xr), atol=1e-5)
    out.sum().backward()  # attacks need input gradients
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_torchscript_archive(tmp_path):
    torch.manual_seed(0)
    net = _tiny_net()
    torch.jit.save(torch.jit.trace(net, torch.rand(3, 1, 8, 8)), tmp_path / "net.ts")
    _check_archive(open_model(tmp_path / "net.ts"), "torchscript", net)


def test_export_archive():
    """``tests/data/tiny_export.pt2`` is ``torch.export.save`` of ``_tiny_net()`` (seed 0,
    dynamic batch) and ``tiny_export_weights.pt`` its state dict (exporting here would take
    seconds of tracing)."""
    net = _tiny_net()
    net.load_state_dict(torch.load(DATA / "tiny_export_weights.pt", weights_only=True))
    _check_archive(open_model(DATA / "tiny_export.pt2"), "export", net)


def test_advdefense_checkpoint_as_model_spec(tmp_path):
    from advdefense.config import build_from_config, config_from_dict, to_dict
    from advdefense.training.checkpoint import make_checkpoint, save_checkpoint

    cfg = config_from_dict({"name": "m", "data": {"name": "digits"}})
    model, _ = build_from_config(cfg)
    save_checkpoint(make_checkpoint(config=to_dict(cfg), model=model), tmp_path / "last.pt")
    loaded = open_model(tmp_path / "last.pt")
    assert loaded.kind == "checkpoint" and loaded.dataset == "digits"
    # a plain state dict passed as --model is refused with the way out
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="--weights"):
        open_model(tmp_path / "sd.pt")


# ---------------------------------------------------------------------------------------------
# bad input: one line each


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_factory_that_does_not_import(tmp_path):
    bad = _write(tmp_path, "broken.py", "import no_such_package_xyz\n")
    with pytest.raises(AdvDefenseError) as e:
        load_model(f"{bad}:build")
    assert "cannot import model file" in _one_line(e) and "no_such_package_xyz" in str(e.value)
    with pytest.raises(AdvDefenseError) as e:
        load_model("no_such_module_xyz.sub:build")
    assert "cannot import module 'no_such_module_xyz.sub'" in _one_line(e)
    good = _write(tmp_path, "good.py", NET)
    with pytest.raises(AdvDefenseError) as e:
        load_model(f"{good}:Nett")
    assert "has no 'Nett'" in _one_line(e) and "Net" in str(e.value)
    with pytest.raises(AdvDefenseError) as e:
        load_model(f"{good}:Net", model_args={"depth": 3})
    assert "failed (TypeError" in _one_line(e)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    good = _write(tmp_path, "good.py", NET)
    torch.manual_seed(0)
    state = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)).state_dict()  # 0.weight, 0.bias
    state["fc.weight"] = torch.zeros(7, 4)  # wrong shape
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(f"{good}:Net", weights=tmp_path / "bad.pt")
    msg = _one_line(e)
    assert "2 missing (conv.bias, conv.weight" in msg or "3 missing" in msg
    assert "unexpected (0.bias, 0.weight)" in msg
    assert "fc.weight: file (7, 4) vs model (10, 4)" in msg
    # a RobustBench checkpoint loaded as a plain state dict: the hint says what to do
    torch.save(RBWideResNet().state_dict(), tmp_path / "rb.pt")
    with pytest.raises(CheckpointError, match="robustbench:wrn-D-W"):
        load_model(f"{good}:Net", weights=tmp_path / "rb.pt")


def test_unsafe_or_foreign_weights_files(tmp_path):
    good = _write(tmp_path, "good.py", NET)
    torch.save({"net": NET_OBJECT}, tmp_path / "pickled.pt")  # a pickled Python object
    with pytest.raises(CheckpointError) as e:
        load_model(f"{good}:Net", weights=tmp_path / "pickled.pt")
    assert "weights_only" in _one_line(e) and "re-save" in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt or not a torch file"):
        load_model(f"{good}:Net", weights=tmp_path / "junk.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="top-level keys: epoch, lr"):
        load_model(f"{good}:Net", weights=tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(f"{good}:Net", weights=tmp_path / "missing.pt")


class _Unpicklable:  # saved by reference: weights_only refuses it
    pass


NET_OBJECT = _Unpicklable()


class _NotLogits(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        out = self.lin(x.flatten(1))
        return {"flat": out.flatten(), "tuple": (out, out), "few": out[:, :3]}[self.kind]


@pytest.mark.parametrize("kind,expected", [("flat", "got shape (20,)"),
                                           ("tuple", "got a tuple of 2"),
                                           ("few", "returns 3 classes")])
def test_output_not_n_by_classes(kind, expected):
    with pytest.raises(AdvDefenseError) as e:
        check_logits(_NotLogits(kind), torch.rand(2, 1, 8, 8), num_classes=10)
    assert expected in _one_line(e)


def test_devices_and_map_location(tmp_path, monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert default_device() == "cpu"
        with pytest.raises(AdvDefenseError, match="--device cpu"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == "cuda:1"
    monkeypatch.undo()
    with pytest.raises(AdvDefenseError, match="unknown device"):
        resolve_device("gpu0")
    torch.save({"a": torch.ones(2)}, tmp_path / "w.pt")
    assert read_state_dict(tmp_path / "w.pt", map_location="meta")["a"].device.type == "meta"
