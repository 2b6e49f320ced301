"""Docs and results speak of the project only: no absolute path of the machine they were made
on and no history of the work; the code that writes results records relative paths
(:mod:`advdefense.provenance`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from advdefense.provenance import command_line, machine, relative_path, relative_value

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("docs", "benchmarks/results", "README.md", "configs")
TEXT_SUFFIXES = {".md", ".json", ".yaml", ".yml", ".txt", ".csv", ".rst", ""}

# absolute paths of a machine: home and scratch folders, a Windows drive. A relative path that
# climbs into one (``../tmp/x``) and URLs (``https://host/home/...``) are not matched.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home|Users|mnt|scratch)/"
                           r"|\b[A-Z]:\\")
# the history of the work: who ran what, in which session or round, for which issue
HISTORY = re.compile(
    r"\bsessions?\s+\d+[a-z]?\b"                     # "session 2", "session 3a"
    r"|\b(?:this|that|previous|earlier|last|next)\s+session\b"
    r"|\bpre-session\b"
    r"|\bround\s+\d+\b"                              # "round 3" ("every round" is fine)
    r"|\bin which round\b"
    r"|~?\b\d+\s+engineers\b|\b(?:other|the|another)\s+engineers?\b"
    r"|\bearlier work of ours\b|\bour earlier work\b"
    r"|\bissues?\s+\d+\b",                           # internal issue numbers ("#12" of a
    re.IGNORECASE)                                   # cited repository is fine)


def checked_files() -> list[Path]:
    """Git-tracked text files under :data:`CHECKED` (every file there without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *CHECKED], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        files = [p for c in CHECKED for p in ([ROOT / c] if (ROOT / c).is_file()
                                               else sorted((ROOT / c).rglob("*")))]
    return [p for p in files if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES]


def offending_lines(text: str, pattern: re.Pattern) -> list[str]:
    return [f"{i}: {line.strip()[:160]}" for i, line in enumerate(text.splitlines(), 1)
            if pattern.search(line)]


def test_there_are_files_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in checked_files()}
    assert "README.md" in names and any(n.startswith("docs/") for n in names)
    assert any(n.startswith("benchmarks/results/") for n in names)


@pytest.mark.parametrize("kind, pattern", [("absolute path", ABSOLUTE_PATH),
                                           ("work history", HISTORY)], ids=["paths", "history"])
def test_docs_and_results_hold_no_machine_paths_or_history(kind, pattern):
    bad = []
    for path in checked_files():
        for line in offending_lines(path.read_text(errors="replace"), pattern):
            bad.append(f"{path.relative_to(ROOT)}:{line}")
    assert not bad, f"{kind} in docs/results (write relative paths, describe the project):\n" \
        + "\n".join(bad)


@pytest.mark.parametrize("text", [
    "python /work/main/benchmarks/bench_pgd.py", "--out-dir /tmp/q", "see /root/.cache",
    "/home/someone/x", "/Users/me/x", r"C:\Users\me", "flock /work/cpu.lock python x",
    '"output": "/work/runs/s3/reproduce"'])
def test_absolute_paths_are_caught(text):
    assert ABSOLUTE_PATH.search(text)


@pytest.mark.parametrize("text", [
    "Session 2's run of the same preset", "session 3b (the config now)", "in session 2",
    "the pre-session-2 default", "in round 3", "shared by ~7 engineers", "issue 7",
    "measured in this session"])
def test_history_is_caught(text):
    assert HISTORY.search(text)


@pytest.mark.parametrize("text", [
    "runs/reproduce_mnist5k", "../tmp/x", "https://example.org/home/page",
    "median over rounds of the per-round ratio", "ratio (best rounds)", "every round",
    "UniSerj/Random-Projection-Filters issue #1", "python benchmarks/run_all.py",
    "training (+ evaluation, including parts cached by earlier runs)"])
def test_legitimate_text_passes(text):
    assert not ABSOLUTE_PATH.search(text) and not HISTORY.search(text)


def test_recorded_commands_and_paths_are_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "x"
    assert relative_path(out) == os.path.join("runs", "x")
    assert relative_path("runs/x") == "runs/x"
    assert relative_value(f"output_dir={out}") == f"output_dir={os.path.join('runs', 'x')}"
    assert relative_value(3) == 3 and relative_value(None) is None
    line = command_line(["advdefense", "reproduce", "--output", str(out),
                         f"--state={tmp_path / 's.json'}", "--set", f"output_dir={out}"])
    assert str(tmp_path) not in line
    assert line == ("advdefense reproduce --output runs/x --state=s.json "
                    "--set output_dir=runs/x").replace("/", os.sep)
    m = machine()
    assert m["cores"] and m["cpu"] and m["torch"] and m["threads"] >= 1


def test_reproduction_report_records_no_absolute_path(tmp_path, monkeypatch):
    from advdefense.reproduction import write_report

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "report"
    root.mkdir()
    write_report(root, title="t", command=command_line(["advdefense", "demo", "--output",
                                                        str(root)]),
                 seed=0, sections=[], curves={}, total_seconds=1.0)
    for name in ("report.md", "report.json"):
        assert str(tmp_path) not in (root / name).read_text()
    assert "cores" in (root / "report.md").read_text()
