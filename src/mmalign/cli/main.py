"""The ``mmalign`` console script: one subcommand per library entry point.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace. Modules are imported lazily so ``mmalign --help``
stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "demo": "mmalign.cli.demo",
    "lab": "mmalign.cli.lab",
    "eval": "mmalign.cli.eval",
    "train": "mmalign.cli.train",
    "sample": "mmalign.cli.sample",
    "data": "mmalign.cli.data",
    "serve": "mmalign.cli.serve",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The config convention shared by every command: ``--config x.yaml`` plus ``key.sub=value``."""
    parser.add_argument("--config", help="YAML config file (fields of the command's config dataclass)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")


def print_metrics(metrics: dict[str, dict]) -> None:
    """The metrics table of the eval commands: ``name  value  [ci_low, ci_high]  n=N`` per metric (None: n/a)."""
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    width = max(len(k) for k in metrics)
    for key, m in metrics.items():
        print(f"{key:<{width}}  {fmt(m['value'])}  [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]  n={m['n']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from mmalign.config import ConfigError
    from mmalign.data.schema import RecordError
    from mmalign.runs import TrainingStopped

    try:
        result = args.func(args)
    except ConfigError as err:
        print(f"mmalign {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except RecordError as err:  # bad input names its file, record and field; no traceback
        print(f"mmalign {args.command}: bad input: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # the run failed, the input was fine: exit 1
        print(f"mmalign {args.command}: training stopped: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
