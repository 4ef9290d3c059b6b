"""The ``mmalign`` console script: one subcommand per library entry point.

How a command module registers: it is listed in ``COMMANDS`` and exposes ``register(subparsers)``, which adds
its parser (``subparsers.add_parser(...)``, nested ``add_subparsers`` for ``mmalign train RECIPE``) and sets
``func``, a callable taking the parsed namespace and returning the exit code. A command configured by a
dataclass calls ``add_config_args(parser, "module.path:ConfigClass")``; it then gets, with no code of its own:

- ``--config x.yaml`` and overrides spelt ``key.sub=value``, ``--key.sub value`` or ``--key.sub=value`` (a bare
  ``--flag`` is ``true``), in order, as ``args.overrides`` for ``mmalign.config.load_config``;
- ``--help`` listing every field of the dataclass (dotted key, type, default, the field's comment) and its
  aliases, and ``--help-config`` printing a commented YAML of the defaults.

The dataclass is named by a string and imported only for help or a run, so ``mmalign --help`` stays fast and a
missing optional dependency only affects its own command. Errors: ``ConfigError``, ``RecordError`` and
``NoHubAccess`` become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

COMMANDS = {
    "demo": "mmalign.cli.demo",
    "lab": "mmalign.cli.lab",
    "eval": "mmalign.cli.eval",
    "train": "mmalign.cli.train",
    "sample": "mmalign.cli.sample",
    "data": "mmalign.cli.data",
    "serve": "mmalign.cli.serve",
    "score": "mmalign.cli.score",
}


def config_class(spec: str) -> type:
    """``"module.path:ClassName"`` -> the class."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose ``--help`` ends with the fields of the command's config dataclass; options
    are never abbreviated (a config key must not be read as a prefix of ``--config``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        from mmalign.config_docs import format_fields

        text = super().format_help()
        spec = self.get_default("config_class")
        if spec is None:
            return text
        cls = config_class(spec)
        return (f"{text}\nconfig fields ({cls.__name__}; YAML via --config, or --key value / key=value):\n"
                f"{format_fields(cls)}\n")


class _TemplateAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from mmalign.config_docs import config_template

        print(config_template(config_class(parser.get_default("config_class"))), end="")
        parser.exit()


def add_config_args(parser: argparse.ArgumentParser, config: str) -> None:
    """The config convention shared by every command (see the module docstring); ``config`` names the command's
    dataclass as ``"module.path:ClassName"``."""
    parser.add_argument("--config", help="YAML config file (fields listed below)")
    parser.add_argument("--help-config", action=_TemplateAction,
                        help="print every field with its default as a commented YAML file, and exit")
    parser.set_defaults(config_class=config, overrides=[])
    parser.usage = "%(prog)s [--config FILE] [--key.sub VALUE | key.sub=VALUE ...]"


def print_metrics(metrics: dict[str, dict]) -> None:
    """The metrics table of the eval commands: ``name  value  [ci_low, ci_high]  n=N`` per metric (None: n/a)."""
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    width = max(len(k) for k in metrics)
    for key, m in metrics.items():
        print(f"{key:<{width}}  {fmt(m['value'])}  [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]  n={m['n']}")


def build_parser() -> CommandParser:
    parser = CommandParser(prog="mmalign", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a configured command's overrides (both spellings) land in ``args.overrides``."""
    from mmalign.config import flags_to_overrides

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "config_class", None) is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args
    args.overrides = flags_to_overrides(rest)
    return args


def main(argv: list[str] | None = None) -> int:
    from mmalign.config import ConfigError
    from mmalign.data.io import NoHubAccess
    from mmalign.data.schema import RecordError
    from mmalign.runs import TrainingStopped

    try:
        args = parse_args(argv)
    except ConfigError as err:
        print(f"mmalign: {err}", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
    except NoHubAccess as err:
        print(f"mmalign {args.command}: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
