"""`concilium` command line. Each area registers its own subcommands; imports stay lazy so the
CLI starts fast and `concilium policy check` does not load torch."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Modules exposing `register(subparsers)`. A module that is not present is skipped.
COMMAND_MODULES = [
    "concilium.gateway.cli",  # serve
    "concilium.policy.cli",  # policy check
    "concilium.router.cli",  # router train / eval / calibrate
    "concilium.router.cascade.replay",  # eval replay
    "concilium.specialists.runtime.cli",  # serve-model
    "concilium.workers.cli",  # worker
    "concilium.gateway.keys_cli",  # keys create / list / disable / enable / rotate / revoke
]


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is absent
        return False


def build_parser() -> argparse.ArgumentParser:
    from concilium import __version__

    parser = argparse.ArgumentParser(prog="concilium", description="Concilium society-of-models gateway")
    parser.add_argument("--version", action="version", version=f"concilium {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        if not _exists(name):
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
