"""``advdefense zoo [list] [--preset P] [--root DIR] [--json]``: what the model zoo holds.

One line per entry (``zoo:<preset>/<entry>-s<seed>``, the name ``evaluate``, ``certify`` and
``analyze`` take as ``--checkpoint``): epochs, test images, clean accuracy and, per verdict of
the entry, its paper-protocol and worst-case accuracy (``≤`` marks a worst case that is only an
upper bound), the weights' dtype and size. Entries are written by ``advdefense reproduce``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=["list"],
                        help="list the entries (the default)")
    parser.add_argument("--preset", default=None, help="only this preset's entries")
    parser.add_argument("--root", default=None,
                        help="zoo folder (default: $ADVDEFENSE_ZOO, else ./zoo, else the "
                             "source checkout's zoo)")
    parser.add_argument("--json", action="store_true", help="print the entries as JSON")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def run(args: argparse.Namespace) -> int:
    from ..zoo import default_root, list_entries, summary_row

    root = Path(args.root) if args.root else default_root()
    rows = [summary_row(e) for e in list_entries(root, preset=args.preset)]
    if args.json:
        print(json.dumps({"root": str(root), "entries": rows}, indent=1))
        return 0
    if not rows:
        print(f"the zoo at {root} holds no entries"
              + (f" of preset {args.preset}" if args.preset else "")
              + "; `advdefense reproduce --preset NAME` adds them as they finish")
        return 0
    print(f"zoo at {root}: {len(rows)} entries")
    print("| name | seed | epochs | n | clean % | paper protocol % -> worst case % | weights |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        figures = "; ".join(
            f"{v['name']}: {_pct(v['paper'])} -> "
            f"{'≤ ' if v['upper_bound'] else ''}{_pct(v['worst'])}" for v in r["verdicts"])
        size = f"{r['dtype'] or '?'}, {(r['bytes'] or 0) / 1024:.0f} KiB"
        print(f"| {r['name']} | {r['seed']} | {r['epochs'] or '–'} | {r['n'] or '–'} | "
              f"{_pct(r['clean'])} | {figures or '–'} | {size} |")
    print("evaluate one: advdefense evaluate --checkpoint zoo:<preset>/<entry>-s<seed> "
          "--suite rand|standard")
    return 0
