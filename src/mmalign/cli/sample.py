"""``mmalign sample bdhs``: Bias-Driven Hallucination Sampling over a record file (``mmalign.sampling.bdhs_run``).

``mmalign sample bdhs --config configs/bdhs_lab.yaml input=in.jsonl output=out.jsonl model=path/to/policy``
(fields of ``BDHSRunConfig``, sampler knobs under ``bdhs.``). Run it under ``accelerate launch`` (GPUs) to split
the records across processes; on CPU, ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N $(which mmalign) ...``
(``accelerate launch --cpu`` leaves spawning to MPI and otherwise starts one process). A killed run resumes
when started again with the same settings.
"""

from __future__ import annotations

import argparse
import sys

from mmalign.cli.corrupt import register_corrupt
from mmalign.cli.main import add_config_args
from mmalign.config import load_config
from mmalign.data.schema import RecordError
from mmalign.sampling.shards import ResumeError


def _bdhs(args: argparse.Namespace) -> int:
    from mmalign.sampling.bdhs_run import BDHSRunConfig, run_bdhs, summary_path

    cfg = load_config(BDHSRunConfig, args.config, args.overrides)
    try:
        summary = run_bdhs(cfg)
    except (RecordError, ResumeError) as err:  # exit code 2, as mmalign.cli.main gives bad input
        print(f"mmalign sample bdhs: {err}", file=sys.stderr)
        return 2
    if summary is not None:
        shares = ", ".join(f"{i}: {share:.1%}" for i, share in summary["accepted_at_iteration"].items())
        print(f"{cfg.output}: {summary['written']} records ({len(summary['dropped'])} dropped); "
              f"accepted at iteration {shares}; summary in {summary_path(cfg.output)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="make rejected answers (BDHS, corruption)")
    sub = parser.add_subparsers(dest="sample_command", required=True, metavar="SAMPLER")
    bdhs = sub.add_parser("bdhs", help="Bias-Driven Hallucination Sampling (Algorithm 1) with a local policy")
    add_config_args(bdhs, "mmalign.sampling.bdhs_run:BDHSRunConfig")
    bdhs.set_defaults(func=_bdhs)
    register_corrupt(sub)
