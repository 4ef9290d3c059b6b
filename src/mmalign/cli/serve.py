"""``mmalign serve model=PATH port=N`` (or ``--model PATH --port N``): an OpenAI-compatible chat server over a
local model, fields of ``mmalign.sampling.server.ServeConfig``; ``api_key_env`` names an environment variable
holding the bearer token clients must send."""

from __future__ import annotations

import argparse
import contextlib
import sys

from mmalign.cli.main import add_config_args
from mmalign.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a local (V)LM at /v1/chat/completions and /v1/models",
                                   description=__doc__)
    add_config_args(parser, "mmalign.sampling.server:ServeConfig")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmalign.sampling.server import ServeConfig, serve  # torch + transformers: loaded only when serving

    cfg = load_config(ServeConfig, args.config, args.overrides)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped
            serve(cfg)
    except (ValueError, OSError) as err:  # no/invalid model directory, port in use, missing API key variable
        print(f"mmalign serve: {err}", file=sys.stderr)
        return 2
    return 0
