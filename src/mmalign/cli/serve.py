"""``mmalign serve --model PATH --port N``: an OpenAI-compatible chat server over a local model."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

from mmalign.cli.main import add_config_args
from mmalign.config import load_config

_FLAGS = ("model", "host", "port", "name")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a local (V)LM at /v1/chat/completions and /v1/models",
                                   description=__doc__)
    parser.add_argument("--model", help="local model directory (config.json, weights, processor files)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks a free one)")
    parser.add_argument("--name", help="model id clients send (default: the model folder's name)")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmalign.sampling.server import ServeConfig, serve  # torch + transformers: loaded only when serving

    cfg = load_config(ServeConfig, args.config, args.overrides)
    try:
        # Flags win over the config file; replace() re-runs the config's validation.
        cfg = dataclasses.replace(cfg, **{k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped
            serve(cfg)
    except (ValueError, OSError) as err:  # no/invalid model directory, port in use
        print(f"mmalign serve: {err}", file=sys.stderr)
        return 2
    return 0
