"""The ``rlvg`` command.

Each subcommand lives beside the code it drives and registers itself here; this file only wires them.
Exit codes: 0 success, 2 bad input (unknown name, bad flag, malformed file), 1 a run that failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# Nothing reaches the network at run time: make the Hugging Face libraries refuse hub look-ups.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlvg",
        description="RL for visual generation: cite the literature, browse the catalog, and run the "
        "reference implementations on tiny models (CPU) or real checkpoints (GPU).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from reference_impls.knowledge import commands as knowledge_commands

    knowledge_commands.register(subparsers)
    try:
        from reference_impls import engine_commands
    except ImportError as error:  # the engine needs torch; the knowledge commands do not
        if "torch" not in str(error) and "engine_commands" not in str(error):
            raise
    else:
        engine_commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # relaunched as is over several processes
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"rlvg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the importable module's main: under ``python -m`` this file is ``__main__``, and subcommands raise
    # ``reference_impls.cli.UsageError``, a different class from ``__main__.UsageError``.
    from reference_impls.cli import main as package_main

    sys.exit(package_main())
