"""``mmalign eval``: evaluate one model; ``mmalign eval compare DIR...``: compare evaluated runs;
``mmalign eval annotator ...``: evaluate a pair annotator (``mmalign.cli.online.run_annotator_eval``);
``mmalign eval bench benchmark=...``: a paper benchmark from its official files (``mmalign.evaluation.bench``).

    mmalign eval --config x.yaml model=runs/lab/model lab_dir=runs/lab out_dir=runs/eval pope.scorer=likelihood
    mmalign eval compare runs/eval_base runs/eval_dpo out_dir=runs/report n_boot=2000
    mmalign eval annotator data=held_out_pairs.jsonl annotator.kind=lab_oracle
    mmalign eval bench benchmark=pope model=runs/dpo/merged pope.files=[coco_pope_adversarial.json] pope.images=val2014

The first writes metrics.json and per-sample JSONL into ``out_dir`` (fields of ``EvalConfig``); the second
writes a report folder (markdown table with paired tests against the first dir, PNG plots); its
``key=value`` arguments are fields of ``CompareConfig``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmalign.cli.main import add_config_args, print_metrics
from mmalign.config import ConfigError, load_config

logger = logging.getLogger(__name__)


def _evaluate(args: argparse.Namespace) -> int:
    from mmalign.evaluation.suite import EvalConfig, evaluate

    cfg = load_config(EvalConfig, args.config, args.overrides)
    result = evaluate(cfg)
    print_metrics(result["metrics"])
    print(f"metrics and per-sample records written to {cfg.out_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mmalign.evaluation.report import CompareConfig, report_runs

    rest = args.overrides[1:]
    dirs = [a for a in rest if "=" not in a]
    if not dirs:
        print("mmalign eval compare: give at least one evaluation dir", file=sys.stderr)
        return 2
    cfg = load_config(CompareConfig, args.config, [a for a in rest if "=" in a])
    path = report_runs(dirs, cfg)
    print(path.read_text())
    print(f"report written to {path.parent}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mmalign.evaluation.bench import BenchConfig, run_benchmark

    cfg = load_config(BenchConfig, args.config, args.overrides[1:])
    result = run_benchmark(cfg)
    print_metrics(result["metrics"])
    print(f"metrics and per-question records written to {cfg.out_dir}")
    return 0


def _annotator(args: argparse.Namespace) -> int:
    from mmalign.cli.online import run_annotator_eval

    return run_annotator_eval(args.config, args.overrides[1:])


# ``mmalign eval ACTION ...``: a first positional argument naming an action; anything else evaluates a model.
ACTIONS = {"compare": _compare, "annotator": _annotator, "bench": _bench}


def _run(args: argparse.Namespace) -> int:
    action = args.overrides[0] if args.overrides and args.overrides[0] in ACTIONS else None
    try:
        return ACTIONS[action](args) if action else _evaluate(args)
    except ConfigError:
        raise  # reported by mmalign.cli.main with exit code 2
    except (ValueError, OSError) as err:  # bad input files: the message names file, record id and field
        logger.debug("traceback", exc_info=True)
        print(f"mmalign eval{' ' + action if action else ''}: error: {err}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="POPE / CHAIR / co-occurrence evaluation of a model; 'compare DIR...' of evaluated runs; "
                     "'annotator ...' of a pair annotator; 'bench benchmark=pope|chair|mmhal|mmhal_v|llava_bench ...' "
                     "from the official files",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, "mmalign.evaluation.suite:EvalConfig")
    parser.set_defaults(func=_run)
