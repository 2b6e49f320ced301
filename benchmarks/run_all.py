"""Run every benchmark in turn and rebuild the combined table (benchmarks/results/table.md).

Each benchmark runs as its own process (fresh interpreter, same flags), so one failing or
missing module does not stop the others; the exit code is non-zero if any failed.

Run: ``python benchmarks/run_all.py [--quick] [--only pgd,eot]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.provenance import command_line  # noqa: E402

ORDER = ["pgd", "eot", "apgd", "bf16", "smoothing", "training_overhead", "memory", "scaling"]


def table(out_dir: Path) -> str:
    """Markdown of every result file in ``out_dir`` (known benchmarks first)."""
    known = [out_dir / f"{name}.json" for name in ORDER]
    extra = sorted(p for p in out_dir.glob("*.json") if p not in known)
    parts = []
    for path in known + extra:
        if not path.exists():
            continue
        name = path.stem
        payload = json.loads(path.read_text())
        if "rows" not in payload or "date_utc" not in payload:
            continue  # another script's result (e.g. eot_vs_transfer.json)
        m = payload["machine"]
        parts.append(f"### {name}\n\n`{payload['command']}` — {payload['date_utc']}, "
                     f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
                     f"torchattacks {m['torchattacks']}, load {m['load_avg_1min_at_start']:.2f}, "
                     f"commit {m['git_commit']}{_busy(payload)}\n\n"
                     + common.markdown(payload["rows"]) + "\n")
    return "\n".join(parts)


def _busy(payload) -> str:
    c = payload.get("contention")
    if not c:
        return ""
    return (f"; other processes used {c['other_processes_cores']:.2f} of "
            f"{payload['machine']['cores']} cores during the {c['wall_s']:.0f} s run")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(ORDER))
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--threads", type=int, help="torch threads of every benchmark (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds of every benchmark")
    p.add_argument("--table-only", action="store_true",
                   help="only rebuild table.md from the result files already there")
    args = p.parse_args(argv)
    if args.table_only:
        args.only = ""
    here = Path(__file__).resolve().parent
    failed = []
    for name in filter(None, args.only.split(",")):
        script = here / f"bench_{name}.py"
        cmd = [sys.executable, str(script), "--out-dir", str(args.out_dir)]
        if args.quick:
            cmd.append("--quick")
        for flag in ("threads", "repeats"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        t0 = time.perf_counter()
        print(f"== {name}: {command_line(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    text = table(args.out_dir)
    (args.out_dir / "table.md").write_text(text)
    print(text)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
