"""Multi-process training (torchrun + DDP on gloo) and the distributed gather helper."""

from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import socket
import subprocess
import sys
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from advdefense.config import config_from_dict, load_config
from advdefense.defenses import rna
from advdefense.defenses.rna import RandomNormalization, RNAState
from advdefense.distributed import gather_per_example, shard_indices
from advdefense.randomness import get_states
from advdefense.training.checkpoint import load_checkpoint
from advdefense.training.trainer import Trainer

CONFIG = {
    "name": "ddp",
    "seed": 11,
    # GroupNorm and no randomness: two half-batches averaged by DDP = one full batch
    "model": {"name": "smallcnn", "norm": "gn"},
    "data": {"limit": 400, "batch_size": 100, "monitor_size": 100},
    "train": {"recipe": "standard", "epochs": 1,
              "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
              "monitor_attack": {"eps": 0.3, "steps": 1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "advdefense", "train", "--config", str(config), "--output", str(out),
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("output:") == 1  # only rank 0 prints
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pt", "metrics.jsonl"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1

    single = Trainer(load_config(config, [f"output_dir={tmp_path / 'one'}"]), device="cpu",
                     progress=False)
    metrics = single.fit()
    two = load_checkpoint(out / "last.pt")["model"]
    one = single.model.state_dict()
    moved = False
    initial = Trainer(load_config(config, [f"output_dir={tmp_path / 'init'}"]), device="cpu",
                      progress=False).model.state_dict()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=1e-4), k
        moved |= not torch.allclose(one[k], initial[k])
    assert moved
    # metrics are all-reduced over the processes: the same numbers as one process
    assert records[0]["monitor_clean_acc"] == metrics["monitor_clean_acc"]
    assert abs(records[0]["train_loss"] - metrics["train_loss"]) < 1e-4
    assert abs(records[0]["train_acc"] - metrics["train_acc"]) < 1e-9


def _gather_worker(rank: int, world: int, port: int, total: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        idx = shard_indices(total)
        assert idx == list(range(rank, total, world))
        local = torch.stack([torch.tensor(idx) * 10, (torch.tensor(idx) % 2 == 0).long()], dim=1)
        full = gather_per_example(local, total)
        ar = torch.arange(total)
        expected = torch.stack([ar * 10, (ar % 2 == 0).long()], dim=1)
        assert torch.equal(full, expected), (rank, full)
        flags = gather_per_example(torch.tensor([i % 3 == 0 for i in idx]), total)
        assert flags.tolist() == [i % 3 == 0 for i in range(total)]
    finally:
        dist.destroy_process_group()


def test_gather_per_example_restores_dataset_order():
    # 7 examples on 2 processes: shards of 4 and 3
    mp.spawn(_gather_worker, args=(2, free_port(), 7), nprocs=2, join=True)
    # single process: identity
    assert torch.equal(gather_per_example(torch.arange(5), 3), torch.arange(3))


def _run_evaluate(cmd_prefix, checkpoint, out, env, *flags):
    cmd = [*cmd_prefix, "-m", "advdefense", "evaluate", "--checkpoint", str(checkpoint),
           "--suite", "rand", "--eps", "0.2", "--examples", "45", "--batch-size", "16",
           "--unit", "16",
           "--output", str(out), "--no-progress", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text())


def test_torchrun_evaluate_matches_one_process(tmp_path):
    """The ``rand`` suite on 45 examples in units of 16 (the batch size), two processes taking
    units from torchrun's store: every per-example result of the cascade (verdicts, what each
    attack ran on, the robust accuracy after it) equals the one-process run's, random starts
    included (seeds come from the examples, not the process); one process runs the checks on
    the merged units and writes the report."""
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    ckpt_dir = tmp_path / "model"
    Trainer(load_config(config, [f"output_dir={ckpt_dir}"]), device="cpu",
            progress=False).fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the failure checks run in the two-process run only (they are most of the time)
    _, one = _run_evaluate([sys.executable], ckpt_dir / "last.pt", tmp_path / "one", env,
                           "--no-checks")
    proc, two = _run_evaluate(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}"],
        ckpt_dir / "last.pt", tmp_path / "two", env)
    assert proc.stdout.count("wrote ") == 1  # only the merging process reports
    p1, p2 = one["per_example"], two["per_example"]
    assert p2["labels"] == p1["labels"] and len(p2["labels"]) == 45
    assert p2["clean"] == p1["clean"] and p2["worst"] == p1["worst"]
    assert 0 < sum(p1["clean"]["all"]) < 45  # a trained but imperfect model: a real check
    assert list(p1["attacks"]) == ["apgd-ce+eot", "apgd-dlr+eot", "square+eot"]
    for label, entry in p1["attacks"].items():
        for key in ("correct", "ran", "robust_after", "passes", "trace"):
            assert p2["attacks"][label].get(key) == entry.get(key), (label, key)
    assert sum(p1["attacks"]["apgd-dlr+eot"]["ran"]) > 0  # the cascade goes on past APGD-CE
    assert two["n"] == 45 and two["processes"] == 2 and two["units"]["count"] == 3
    assert two["checks"] and not one["checks"]


# -- RNA under DDP: recipes with two forwards, SyncBatchNorm, shared paths ---------------------
def _check_sync_rna_layer(rank: int, world: int) -> None:
    """A synchronized RNA BatchNorm normalizes with the statistics of the global batch (also on a
    masked subset of rows), and gradients flow back across processes."""
    torch.manual_seed(0)
    full = torch.randn(4 * world, 3, 4, 4) * 2 + 1
    weights = torch.randn_like(full)
    mine = slice(4 * rank, 4 * (rank + 1))
    cases = ((torch.tensor([0, 1, 0, 0, 1, 0, 0, 1]), True), (torch.tensor([0]), False))
    for (types, per_sample), how in itertools.product(cases, ("flag", "SyncBatchNorm entry")):
        ref = RandomNormalization(3, ("bn", "in")).train()
        layer = copy.deepcopy(ref)
        if how == "flag":  # what train.sync_bn does (DDP refuses SyncBatchNorm on CPU)
            assert rna.set_sync_batchnorm(layer) == 1
        else:
            layer = nn.SyncBatchNorm.convert_sync_batchnorm(layer)
            assert isinstance(layer.norms[0], nn.SyncBatchNorm)
        xf = full.clone().requires_grad_(True)
        out_full = ref.forward_with_state(xf, RNAState(types, per_sample))
        (out_full * weights).sum().backward()
        xr = full[mine].clone().requires_grad_(True)
        out = layer.forward_with_state(xr, RNAState(types[mine] if per_sample else types,
                                                    per_sample))
        (out * weights[mine]).sum().backward()
        torch.testing.assert_close(out, out_full[mine])
        torch.testing.assert_close(xr.grad, xf.grad[mine])
        grad_w = layer.norms[0].weight.grad.clone()
        dist.all_reduce(grad_w)
        torch.testing.assert_close(grad_w, ref.norms[0].weight.grad)
        torch.testing.assert_close(layer.norms[0].running_mean, ref.norms[0].running_mean)
        torch.testing.assert_close(layer.norms[0].running_var, ref.norms[0].running_var)


def _gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def _rna_ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_sync_rna_layer(rank, world)
        runs = (("trades_sync", "trades", {}, True),
                ("clean_weight", "pgd_at", {"clean_weight": 0.5, "attack_label": "predicted"},
                 False))
        for name, recipe, args, sync_bn in runs:
            cfg = config_from_dict({
                "name": name, "seed": 5, "output_dir": os.path.join(out, name),
                "data": {"limit": 48, "batch_size": 16, "monitor_size": 0},
                "model": {"name": "smallcnn", "norm": "bn"},
                "defense": {"rna": {"space": ["bn", "in"]}},
                "train": {"recipe": recipe, "recipe_args": args, "epochs": 1,
                          "sync_bn": sync_bn, "attack": {"eps": 0.3, "steps": 1},
                          "optimizer": {"name": "sgd", "lr": 0.05}},
            })
            trainer = Trainer(cfg, device="cpu", progress=False)
            initial = [p.detach().clone() for p in trainer.model.parameters()]
            metrics = trainer.fit()
            assert metrics["train_loss"] == metrics["train_loss"], metrics
            params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            a, b = _gathered(params, world)
            assert torch.equal(a, b), name  # DDP kept the replicas identical
            assert any(not torch.equal(p, q) for p, q in
                       zip(initial, trainer.model.parameters(), strict=True))
            if sync_bn:
                assert trainer.path_generator is not None
                # one path per step on every process, and BN statistics of the global batch
                types = torch.cat([s.types.flatten() for s in get_states(trainer.model)])
                a, b = _gathered(types, world)
                assert torch.equal(a, b)
                bufs = torch.cat([v.flatten().float() for k, v in
                                  trainer.model.state_dict().items() if "running" in k])
                a, b = _gathered(bufs, world)
                torch.testing.assert_close(a, b)
            wrapper = weakref.ref(trainer.train_model)
            trainer.close()
            gc.collect()
            # close() releases the DDP wrapper (which keeps the gloo backend alive), so it is
            # gone before the group is destroyed, not left for the interpreter's shutdown
            assert wrapper() is None
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_trains_rna_with_two_forward_recipes_and_sync_bn(tmp_path):
    """TRADES (with sync_bn) and pgd_at with clean_weight > 0 on a stochastic RNA model:
    each used to run two DDP forwards per step, which DDP rejects for such models."""
    mp.spawn(_rna_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
