"""``mmalign score``: reward-model margins for every answer slot of a record file (``mmalign.sampling.score_run``).

    mmalign score input=pairs.jsonl output=pairs_scored.jsonl model=runs/rm/reward_model
    mmalign score input=pairs.jsonl output=scored.jsonl model=runs/critique_rm/reward_model critiques=given

Writes ``meta.reward_margins`` (one per rejected answer: what ``mmalign train dpo loss.dynamic_beta=true`` reads)
and ``meta.rewards`` per record, with a provenance sidecar (fields of ``ScoreConfig``). Under ``accelerate launch``
the records are split across processes; a killed run resumes when started again with the same settings.
"""

from __future__ import annotations

import argparse
import sys

from mmalign.cli.main import add_config_args


def _score(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.data.collate import SequenceTooLong
    from mmalign.data.schema import RecordError
    from mmalign.sampling.score_run import ScoreConfig, run_score
    from mmalign.sampling.shards import ResumeError

    cfg = load_config(ScoreConfig, args.config, args.overrides)
    try:
        out = run_score(cfg)
    except (RecordError, ResumeError, SequenceTooLong) as err:  # exit code 2, as mmalign.cli.main gives bad input
        print(f"mmalign score: {err}", file=sys.stderr)
        return 2
    print(f"scored records written to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("score", help="reward-model margins per answer slot of a record file (ScoreConfig)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "mmalign.sampling.score_run:ScoreConfig")
    parser.set_defaults(func=_score)
