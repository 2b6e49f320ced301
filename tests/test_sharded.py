"""Results that do not depend on the number of processes: evaluation and certification in
units of work handed out through torchrun's store, merged by index, resumed after a lost
process (CPU processes, ``OMP_NUM_THREADS=1``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from advdefense.attacks import build_attack
from advdefense.attacks.base import batch_seed
from advdefense.cli import main
from advdefense.config import config_from_dict
from advdefense.data import as_tensors, load_split
from advdefense.defenses import smoothing
from advdefense.distributed import LocalStore
from advdefense.evaluation import AttackSpec, evaluate
from advdefense.evaluation.suite import run_suite
from advdefense.evaluation.units import (
    EXIT_AFTER_ENV,
    UnitJob,
    merge_results,
    result_from_json,
    result_to_json,
    unit_bounds,
)
from advdefense.loading import open_model
from advdefense.randomness import draw_seed
from advdefense.training.trainer import Trainer

#: what may differ between two runs of one job: timings, the process count, the command line
RUN_KEYS = ("seconds", "checks_seconds", "processes", "command", "units")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A smallcnn with RNA (one random normalization per example), one epoch on mnist5k."""
    out = tmp_path_factory.mktemp("sharded") / "model"
    cfg = config_from_dict({
        "name": "sharded", "seed": 3, "output_dir": str(out),
        "model": {"name": "smallcnn", "norm": "bn"},
        "defense": {"rna": {"space": ["bn", "in"], "granularity": "sample"}},
        "data": {"name": "mnist5k", "limit": 300, "batch_size": 50, "monitor_size": 0},
        "train": {"recipe": "standard", "epochs": 1,
                  "optimizer": {"name": "adam", "lr": 0.003}}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, device="cpu", progress=False)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return out / "last.pt", trainer.model.eval()


def in_one_process(args: list[str]) -> int:
    """``advdefense ...`` in this process, on one thread like the torchrun processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def torchrun(launcher: list[str], args: list[str], cwd, env: dict | None = None
             ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "advdefense", *args]
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1",
                                               **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` of each process, once it ended."""
    out = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, out, strict=True)]


def local(nproc: int) -> list[str]:
    return [f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


def two_nodes(port: int) -> list[str]:
    """One process on each of two "nodes" that meet through a c10d rendezvous."""
    return ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=sharded"]


def stripped(d):
    if isinstance(d, dict):
        return {k: stripped(v) for k, v in d.items() if k not in RUN_KEYS}
    if isinstance(d, list):
        return [stripped(v) for v in d]
    return d


def unit_files(units) -> list[str]:
    """The finished unit files under a units folder."""
    return sorted(p.name for p in units.glob("*/unit-*.json") if ".state" not in p.name)


# -- in one process ----------------------------------------------------------------------------
def test_units_merge_into_the_result_of_the_whole_set(checkpoint):
    """Units evaluated with the global index of their first example and merged by index give
    the whole-set result: verdicts, traces (in whole-set indices), passes; a unit survives
    its file (JSON) unchanged."""
    _, model = checkpoint
    x, y = as_tensors(load_split("mnist5k", "test", limit=12))
    specs = [AttackSpec("pgd", build_attack("pgd", eps=0.3, steps=3, eot_samples=2, seed=1))]
    kw = dict(repeats=3, batch_size=4, seed=5, checks=None)
    whole = evaluate(model, (x, y), specs, **kw)
    parts = [(a, result_from_json(json.loads(json.dumps(result_to_json(
        evaluate(model, (x[a:b], y[a:b]), specs, index_offset=a, **kw))))))
        for a, b in unit_bounds(12, 4)]
    merged = merge_results(parts)
    for kind in ("all", "majority", "single"):
        assert torch.equal(merged.worst.get(kind), whole.worst.get(kind))
        assert torch.equal(merged.clean.verdict.get(kind), whole.clean.verdict.get(kind))
    a, b = merged.entries["pgd/fresh"], whole.entries["pgd/fresh"]
    assert torch.equal(a.trace.losses, b.trace.losses)
    assert torch.equal(a.trace.ever_adversarial, b.trace.ever_adversarial)
    assert a.passes == b.passes and merged.n == 12
    # a suite's cascade runs inside each unit: ran masks and cumulative verdicts tile too
    atk = build_attack("fgsm", eps=0.2)
    suite = [(a, run_suite(model, (x[a:b], y[a:b]), eps=0.2, attacks=[("fgsm", atk)],
                           index_offset=a, **kw)) for a, b in unit_bounds(12, 6)]
    joined = merge_results(suite)
    assert torch.equal(joined.entries["fgsm"].ran,
                       torch.cat([r.entries["fgsm"].ran for _, r in suite]))
    assert torch.equal(joined.worst.all, torch.cat([r.worst.all for _, r in suite]))


def test_a_job_runs_each_item_once_resumes_the_missing_and_merges_once(tmp_path):
    """Items go to exactly one of several workers sharing a store, exactly one worker merges;
    a worker that dies loses its item, and a rerun computes only the missing ones."""
    names = [f"unit-{i:06d}" for i in range(6)]
    done: list[int] = []

    def work(i, _state):
        done.append(i)
        return {"value": i * i}

    store = LocalStore()
    jobs = [UnitJob(tmp_path / "a", "fp", names, store=store) for _ in range(3)]
    merged = [None] * 3
    threads = [threading.Thread(target=lambda k=k: merged.__setitem__(k, jobs[k].run(work)))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == list(range(6)) and sum(merged) == 1
    assert [jobs[0].load(i)["value"] for i in range(6)] == [i * i for i in range(6)]

    class Lost(Exception):
        pass

    def dies_on_the_third(i, _state):
        if i == 2:
            raise Lost
        return work(i, _state)

    done.clear()
    with pytest.raises(Lost):
        UnitJob(tmp_path / "b", "fp", names).run(dies_on_the_third)
    assert UnitJob(tmp_path / "b", "fp", names).missing() == [2, 3, 4, 5]
    done.clear()
    assert UnitJob(tmp_path / "b", "fp", names).run(work) is True
    assert done == [2, 3, 4, 5]
    done.clear()
    assert UnitJob(tmp_path / "b", "fp", names).run(work) is True and done == []


def test_sharded_certification_adds_vote_counts():
    """certify with shards = the bound on the summed counts of independently seeded shards;
    one shard is the unsharded estimation."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(4, 1, 4, 4)
    kw = dict(sigma=0.5, n0=8, n=50, alpha=0.01, seed=9)
    sharded = smoothing.certify(base, x, shard_samples=20, **kw)
    counts = sum(smoothing.counts(base, x, sigma=0.5, num=m, seed=smoothing.estimation_seed(9, s))
                 for s, m in enumerate(smoothing.shard_sizes(50, 20)))
    assert smoothing.shard_sizes(50, 20) == [20, 20, 10] and int(counts.sum()) == 4 * 50
    select = smoothing.counts(base, x, sigma=0.5, num=8, seed=smoothing.selection_seed(9))
    again = smoothing.certify_from_counts(select, counts, sigma=0.5, alpha=0.01)
    assert torch.equal(sharded.radius, again.radius) and torch.equal(sharded.count, again.count)
    one = smoothing.certify(base, x, **kw)
    est = smoothing.counts(base, x, sigma=0.5, num=50, seed=draw_seed(9, 1))
    assert torch.equal(one.count, est.gather(1, select.argmax(1)[:, None]).squeeze(1))


# -- torchrun processes ------------------------------------------------------------------------
def test_evaluation_is_the_same_at_1_2_3_processes_and_after_a_lost_process(checkpoint,
                                                                           tmp_path,
                                                                           monkeypatch):
    """A stochastic model: one process, two processes, and three processes of which one dies
    after its first unit, the job then completed by a rerun on "two nodes", give the same
    per-example results, traces and report; the trace checks run once, on the merged units."""
    ckpt, _ = checkpoint
    args = ["evaluate", "--checkpoint", str(ckpt), "--attacks", "fgsm,pgd", "--steps", "2",
            "--eps", "0.3", "--examples", "24", "--unit", "3", "--batch-size", "2",
            "--repeats", "3", "--eot", "2", "--no-check-probes", "--no-progress"]
    monkeypatch.chdir(tmp_path)  # reports name paths relative to the working folder
    assert in_one_process([*args, "--output", "one"]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert 0 < sum(one["per_example"]["clean"]["all"]) < 24
    assert {c["name"] for c in one["checks"]} >= {"silent_success", "randomness_without_eot"}
    assert len(unit_files(tmp_path / "one" / "units")) == 8

    two = torchrun(local(2), [*args, "--output", "two"], tmp_path)
    rerun = [*args, "--output", "three", "--units", "lost_units"]
    lost = torchrun(local(3), rerun, tmp_path, {EXIT_AFTER_ENV: "1:1"})
    (rc2, out2, err2), (rc3, _, _) = finish(two, lost)
    assert rc2 == 0, err2[-3000:]
    assert out2.count("wrote ") == 1  # one process merges and reports
    report2 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert stripped(report2) == stripped(one) and report2["processes"] == 2

    # the lost process wrote its unit but never counted it done: nobody merged
    assert rc3 != 0 and not (tmp_path / "three" / "report.json").exists()
    assert len(unit_files(tmp_path / "lost_units")) >= 1
    port = free_port()
    nodes = [torchrun(two_nodes(port), rerun, tmp_path) for _ in range(2)]
    results = finish(*nodes)
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-3000:]
    assert sum(out.count("wrote ") for _, out, _ in results) == 1
    report3 = json.loads((tmp_path / "three" / "report.json").read_text())
    assert stripped(report3) == stripped(one)
    assert len(unit_files(tmp_path / "lost_units")) == 8


def test_certification_is_the_same_at_1_2_3_processes(checkpoint, tmp_path, monkeypatch):
    """Units of examples and shards of samples: the radii of one process, of three processes
    that each die after their first item (every one: a process that starts late may get no
    item at all, so naming one rank would not always lose one), completed by two processes,
    are identical, and equal to certify with the same shards."""
    ckpt, _ = checkpoint
    args = ["certify", "--checkpoint", str(ckpt), "--sigma", "0.25", "--limit", "6",
            "--unit", "2", "--samples", "60", "--n0", "10", "--shard-samples", "20",
            "--no-progress"]
    monkeypatch.chdir(tmp_path)
    assert in_one_process([*args, "--output", "one"]) == 0
    one = json.loads((tmp_path / "one" / "certify.json").read_text())
    assert len(unit_files(tmp_path / "one" / "units")) == 3 * 3
    (rc, _, _), = finish(torchrun(local(3), [*args, "--output", "many"], tmp_path,
                                  {EXIT_AFTER_ENV: "*:1"}))
    assert rc != 0 and not (tmp_path / "many" / "certify.json").exists()
    (rc, out, err), = finish(torchrun(local(2), [*args, "--output", "many"], tmp_path))
    assert rc == 0, err[-3000:]
    assert out.count("certified acc") == 1
    many = json.loads((tmp_path / "many" / "certify.json").read_text())
    assert many["per_example"] == one["per_example"]
    assert many["certified_accuracy"] == one["certified_accuracy"]
    x, _ = as_tensors(load_split("mnist5k", "test", limit=6))
    model = open_model(None, checkpoint=str(ckpt), device="cpu").model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        radii = torch.cat([smoothing.certify(model, x[a:b], sigma=0.25, n0=10, n=60,
                                             alpha=0.001, seed=batch_seed(0, a),
                                             shard_samples=20).radius
                           for a, b in unit_bounds(6, 2)])
    finally:
        torch.set_num_threads(threads)
    assert [e["radius"] for e in one["per_example"]] == radii.tolist()
