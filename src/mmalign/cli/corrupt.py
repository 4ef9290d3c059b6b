"""``mmalign sample corrupt``: turn chosen answers into preference pairs by corruption (LLM or lab rule).

Wired under ``mmalign sample`` by ``register_corrupt``. Examples::

    mmalign sample corrupt input=sft.jsonl output=pairs.jsonl llm.endpoint.base_url=http://127.0.0.1:8000/v1 \\
        llm.endpoint.model=my-llm llm.endpoint.api_key_env=OPENAI_API_KEY
    mmalign sample corrupt method=lab lab_dir=lab input=lab/pref_prompts.jsonl output=lab/pairs_corrupt.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

from mmalign.cli.main import add_config_args
from mmalign.config import load_config
from mmalign.sampling.corrupt import CorruptConfig, run_corruption
from mmalign.sampling.openai_client import ChatError


def register_corrupt(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("corrupt", help="corrupt chosen answers into rejected ones (LLM endpoint or lab)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "mmalign.sampling.corrupt:CorruptConfig")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(CorruptConfig, args.config, args.overrides)
    try:
        summary = run_corruption(cfg)
    except (ValueError, OSError, ChatError) as err:  # missing or bad files, bad records, a failed endpoint
        print(f"mmalign sample corrupt: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
