"""The ``advdefense`` command line: ``advdefense <command> [options]``.

Library code never prints; commands print. Any :class:`AdvDefenseError` becomes one line on
stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .commands import ANALYSES, COMMANDS
from .errors import AdvDefenseError


def _add(sub, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as exc:  # a command not built yet
        if exc.name != module:
            raise
        parser.set_defaults(_missing=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advdefense", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text)
    analyze = sub.add_parser("analyze", help="analyses: " + ", ".join(ANALYSES))
    asub = analyze.add_subparsers(dest="analysis", metavar="analysis")
    for name, (module, help_text) in ANALYSES.items():
        _add(asub, name, module, help_text)
    return parser


def _resolve_zoo_checkpoint(args: argparse.Namespace) -> None:
    """``--checkpoint zoo:<preset>/<entry>-s<seed>`` (or ``--model zoo:...``) names a zoo entry:
    it becomes ``--checkpoint`` with the entry's weights file, and outputs default to
    ``runs/zoo/<preset>/<entry>/<command>`` (not into the zoo)."""
    names = [getattr(args, key, None) for key in ("checkpoint", "model")]
    name = next((n for n in names if isinstance(n, str) and n.startswith("zoo:")), None)
    if name is None or not hasattr(args, "checkpoint"):
        return
    from .loading import resolve_zoo_name
    from .zoo import parse_name

    if args.checkpoint is not None and getattr(args, "model", None) is not None:
        return  # both given: the command says so
    args.checkpoint, args.model = str(resolve_zoo_name(name)), None
    if hasattr(args, "output") and args.output is None:
        preset, entry = parse_name(name)
        what = getattr(args, "analysis", None) or args.command
        args.output = str(Path("runs") / "zoo" / preset / entry / what)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"advdefense: error: command {args.command!r} is not available in this build",
              file=sys.stderr)
        return 2
    try:
        _resolve_zoo_checkpoint(args)
        return int(importlib.import_module(args._module).run(args) or 0)
    except AdvDefenseError as exc:
        print(f"advdefense: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advdefense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
