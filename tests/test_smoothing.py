"""SmoothedClassifier votes, sampling and Cohen et al. certification."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from advdefense.defenses.noise import inject
from advdefense.defenses.smoothing import (
    SmoothedClassifier,
    certify,
    clopper_pearson_lower,
    sample_logits,
    vote_scores,
)
from advdefense.errors import AdvDefenseError
from advdefense.randomness import is_stochastic

from .conftest import make_smallcnn

# three samples, one example, four classes
LOGITS = torch.tensor([[[3.0, 2.0, 1.0, 0.0]],
                       [[0.0, 5.0, 4.0, 1.0]],
                       [[0.0, 9.0, 1.0, 2.0]]])


def test_prediction_vote_by_hand():
    torch.testing.assert_close(vote_scores(LOGITS, "prediction"),
                               torch.tensor([[1 / 3, 2 / 3, 0.0, 0.0]]))


def test_weighted_vote_by_hand():
    # ranks: s0 -> [0,1,2,3]; s1 -> [3,0,1,2]; s2 -> [3,0,2,1]; weight 2^-rank
    w = torch.tensor([1 + 1 / 8 + 1 / 8, 1 / 2 + 1 + 1, 1 / 4 + 1 / 2 + 1 / 4,
                      1 / 8 + 1 / 4 + 1 / 2])
    got = vote_scores(LOGITS, "weighted")
    torch.testing.assert_close(got, (w / w.sum())[None])
    torch.testing.assert_close(got.sum(), torch.tensor(1.0))


def test_topk_vote_by_hand():
    # top-2 of each sample: {0,1}, {1,2}, {1,3}: counts 1, 3, 1, 1 of 6 votes
    got = vote_scores(LOGITS, "topk", k=2)
    torch.testing.assert_close(got.sum(), torch.tensor(1.0))
    assert got.argmax() == 1
    # counts/6 plus the weighted vote / (2 * 6) (under half a vote), renormalised
    counts = torch.tensor([[1, 3, 1, 1]]) / 6.0
    weighted = vote_scores(LOGITS, "weighted")
    torch.testing.assert_close(got * (1 + 1 / 12), counts + weighted / 12)
    # ties among classes 0, 2, 3 are broken by the rank-weighted vote, not by class index
    tied = [0, 2, 3]
    assert got[0, tied].argmax() == weighted[0, tied].argmax() == 0


def test_topk_vote_with_identical_samples_is_the_top1_class():
    """Every sample ranks the classes alike: the top-k counts tie over k classes; the vote
    must still return each sample's top class (before the tie-break it returned the lowest
    class index of the k)."""
    logits = torch.tensor([[0.1, 0.5, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0]]).expand(5, 2, 4)
    assert vote_scores(logits, "topk", k=3).argmax(1).tolist() == [2, 1]


def test_soft_vote_is_mean_softmax_not_mean_logits():
    got = vote_scores(LOGITS, "soft")
    torch.testing.assert_close(got, LOGITS.softmax(2).mean(0))
    assert got.argmax() == 1
    # one over-confident draw dominates a mean of logits but not a mean of probabilities
    logits = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]], [[2.0, 0.0]], [[-10.0, 0.0]]])
    assert vote_scores(logits, "soft").argmax() == 0
    assert logits.mean(0).argmax() == 1


def test_weighted_and_prediction_can_disagree():
    # class 0 wins 3 of 5 hard votes (weight 3 + 2/8) but class 1 is second there and first
    # in the other two (weight 3/2 + 2)
    a, b = [2.0, 1.9, 0.0, -1.0], [-5.0, 3.0, 2.0, 1.0]
    logits = torch.tensor([[a], [a], [a], [b], [b]])
    assert vote_scores(logits, "prediction").argmax() == 0
    assert vote_scores(logits, "weighted").argmax() == 1


def test_sigma_zero_deterministic_base_equals_base(standard_model, mnist_test):
    x = mnist_test[0][:50]
    base_pred = standard_model(x).argmax(1)
    for vote in ("prediction", "weighted", "topk", "soft"):
        # top-k with k = 3: every sample is identical, so the counts tie over 3 classes
        smooth = SmoothedClassifier(standard_model, sigma=0.0, m=4, vote=vote, k=3,
                                    max_batch=64)
        with torch.no_grad():
            assert torch.equal(smooth(x).argmax(1), base_pred)
    assert is_stochastic(SmoothedClassifier(standard_model, sigma=0.1, m=2))


def test_samples_are_independent_and_chunking_is_consistent():
    model = inject(make_smallcnn(), kind="pni").eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits = sample_logits(model, x, sigma=0.1, m=7, max_batch=5)
    assert logits.shape == (7, 3, 10)
    assert not torch.allclose(logits[0], logits[1])
    # with sigma = 0 and a deterministic base every sample is the same, whatever the chunking
    base = make_smallcnn().eval()
    with torch.no_grad():
        a = sample_logits(base, x, sigma=0.0, m=5, max_batch=2)
    torch.testing.assert_close(a, a[:1].expand_as(a))


def test_forward_scores_normalised_and_gradient_available():
    model = make_smallcnn().eval()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    smooth = SmoothedClassifier(model, sigma=0.1, m=6, vote="prediction", max_batch=4)
    scores = smooth(x)
    torch.testing.assert_close(scores.detach().sum(1), torch.ones(2))
    assert torch.allclose(scores.detach() * 6, (scores.detach() * 6).round())
    scores[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_predict_abstains_on_a_coin_flip_and_not_on_a_sure_class():
    class Coin(nn.Module):
        def forward(self, x):
            flip = (torch.rand(x.shape[0]) < 0.5).float()
            return torch.stack([flip, 1 - flip, torch.full_like(flip, -1)], 1)

    class Sure(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, -1.0]]).repeat(x.shape[0], 1)

    torch.manual_seed(0)
    x = torch.rand(4, 1, 4, 4)
    coin = SmoothedClassifier(Coin(), sigma=0.1, m=200, abstain_alpha=0.001)
    assert (coin.predict(x) == -1).all()
    sure = SmoothedClassifier(Sure(), sigma=0.1, m=50, abstain_alpha=0.001)
    assert (sure.predict(x) == 1).all()


def test_certify_matches_direct_clopper_pearson():
    class Threshold(nn.Module):
        """class 1 iff the noisy mean pixel exceeds 0.5: p_A is known in closed form."""

        def forward(self, x):
            s = x.flatten(1).mean(1)
            return torch.stack([0.5 - s, s - 0.5], 1) * 10

    torch.manual_seed(0)
    d = 16
    x = torch.full((3, 1, 4, 4), 0.5)
    x[0] += 0.05
    x[1] -= 0.2
    x[2] += 0.0  # coin flip: should abstain
    sigma, n, alpha = 0.5, 2000, 0.001
    res = certify(Threshold(), x, sigma=sigma, n0=100, n=n, alpha=alpha, batch_samples=500)
    for i in range(3):
        na = int(res.count[i])
        direct = beta.ppf(alpha, na, n - na + 1) if na > 0 else 0.0
        assert abs(res.p_lower[i].item() - direct) < 1e-6
        if direct > 0.5:
            assert abs(res.radius[i].item() - sigma * norm.ppf(direct)) < 1e-5
        else:
            assert res.prediction[i] == -1 and res.radius[i] == 0
    # the true p_A of example 0 is Phi(0.05 / (sigma / sqrt(d))); its bound must be below it
    true_p = norm.cdf(0.05 / (sigma / d**0.5))
    assert res.prediction[0] == 1 and res.p_lower[0] < true_p
    assert res.prediction[1] == 0 and res.radius[1] > 0
    assert res.prediction[2] == -1
    assert clopper_pearson_lower(0, 10, 0.01) == 0.0


def test_bad_arguments():
    with pytest.raises(AdvDefenseError):
        SmoothedClassifier(nn.Identity(), sigma=-1, m=2)
    with pytest.raises(AdvDefenseError):
        SmoothedClassifier(nn.Identity(), sigma=0.1, m=0)
    with pytest.raises(AdvDefenseError):
        SmoothedClassifier(nn.Identity(), sigma=0.1, vote="mean")
    with pytest.raises(AdvDefenseError):
        certify(nn.Identity(), torch.zeros(1, 1, 2, 2), sigma=0.0)


def test_cli_analyze_smoothing_and_certify_smoke(tmp_path):
    import json

    from advdefense.cli import main
    from advdefense.config import build_from_config, load_config, to_dict
    from advdefense.training.checkpoint import make_checkpoint, save_checkpoint

    cfg = load_config("configs/pni_at_mnist5k.yaml")
    model, _ = build_from_config(cfg)
    ckpt = save_checkpoint(make_checkpoint(config=to_dict(cfg), model=model), tmp_path / "c.pt")
    out = tmp_path / "sm"
    code = main(["analyze", "smoothing", "--checkpoint", str(ckpt), "--sigmas", "0,0.1",
                 "--ms", "1,2", "--n-val", "6", "--n-test", "4", "--steps", "1",
                 "--attack-samples", "2", "--repeats", "1", "--output", str(out),
                 "--no-progress"])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["records"]) == 2 * 2 * 4 and sweep["chosen_on_val"]["split"] == "val"
    assert (out / "acc_vs_m.png").exists() and (out / "test_table.md").exists()
    code = main(["certify", "--checkpoint", str(ckpt), "--sigma", "0.25", "--n", "50",
                 "--n0", "10", "--limit", "3", "--output", str(tmp_path / "cert")])
    assert code == 0
    cert = json.loads((tmp_path / "cert" / "certify.json").read_text())
    assert len(cert["per_example"]) == 3 and "0.25" in cert["certified_accuracy"]


def test_outer_draw_groups_give_independent_weight_noise():
    from advdefense.randomness import draw_groups
    model = inject(make_smallcnn(), kind="pni", alpha_init=1.0).eval()
    smooth = SmoothedClassifier(model, sigma=0.0, m=1, vote="soft")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad(), draw_groups(3):
        out = smooth(x.repeat(3, 1, 1, 1)).view(3, 2, -1)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_gradient_through_the_vote_is_the_soft_gradient_in_bounded_memory():
    """The gradient of a smoothed classifier's scores equals that of its mean softmax over the
    same samples, and is computed chunk by chunk (never more than max_batch rows at once)."""
    import torch
    from torch import nn

    from advdefense.defenses.smoothing import SmoothedClassifier
    from advdefense.randomness import freeze

    torch.manual_seed(0)
    seen = []
    base = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    base.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    x = torch.rand(3, 12)
    for vote in ("soft", "prediction"):
        sm = SmoothedClassifier(base, sigma=0.3, m=16, vote=vote, max_batch=12)
        with freeze(sm):  # the same 16 samples for both computations
            xi = x.clone().requires_grad_(True)
            out = sm(xi)
            assert "VoteWithSoftGradient" in type(out.grad_fn).__name__  # no m x N graph kept
            (g,) = torch.autograd.grad(out[:, 1].sum(), xi)
            xr = x.clone().requires_grad_(True)
            soft = sm.soft_scores(xr)
            (g_ref,) = torch.autograd.grad(soft[:, 1].sum(), xr)
        assert torch.allclose(g, g_ref, atol=1e-6), vote
        assert torch.allclose(out.detach().sum(1), torch.ones(3))
    assert max(seen) <= 12


def test_certify_resumes_from_its_state_file(tmp_path, monkeypatch):
    """``advdefense certify --state F`` saves every batch; a rerun reads them back and gives
    the same certificates."""
    import json

    import torch

    from advdefense.cli import main
    from advdefense.config import build_from_config, config_from_dict, to_dict
    from advdefense.defenses import smoothing
    from advdefense.training.checkpoint import make_checkpoint, save_checkpoint

    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"name": "cert", "data": {"name": "digits"},
                            "model": {"name": "smallcnn"}})
    torch.manual_seed(0)
    model, _ = build_from_config(cfg)
    save_checkpoint(make_checkpoint(config=to_dict(cfg), model=model), tmp_path / "m.pt")
    args = ["certify", "--checkpoint", "m.pt", "--sigma", "0.25", "--n0", "5", "--n", "20",
            "--limit", "6", "--batch", "2", "--state", "cert_state.json", "--no-progress"]
    assert main([*args, "--output", "a"]) == 0
    calls = []
    real = smoothing.certify
    monkeypatch.setattr(smoothing, "certify", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*args, "--output", "b"]) == 0
    assert calls == []  # every batch came from the state file
    a = json.loads((tmp_path / "a" / "certify.json").read_text())["per_example"]
    b = json.loads((tmp_path / "b" / "certify.json").read_text())["per_example"]
    assert a == b
