"""``mmalign eval``: evaluate one model; ``mmalign eval compare DIR...``: compare evaluated runs;
``mmalign eval annotator ...``: evaluate a pair annotator (``mmalign.cli.online.run_annotator_eval``);
``mmalign eval bench benchmark=...``: a paper benchmark from its official files (``mmalign.evaluation.bench``);
``mmalign eval rm ...``: a reward model's ACC / ACC+ on held-out pairs; ``mmalign eval rm-matrix --config x.yaml``:
every reward model on every held-out set (``mmalign.evaluation.reward_bench``).

    mmalign eval --config x.yaml model=runs/lab/model lab_dir=runs/lab out_dir=runs/eval pope.scorer=likelihood
    mmalign eval compare runs/eval_base runs/eval_dpo out_dir=runs/report n_boot=2000
    mmalign eval annotator data=held_out_pairs.jsonl annotator.kind=lab_oracle
    mmalign eval bench benchmark=pope model=runs/dpo/merged pope.files=[coco_pope_adversarial.json] pope.images=val2014
    mmalign eval rm data=held_out_pairs.jsonl model=runs/rm/reward_model out_dir=runs/eval_rm

The first writes metrics.json and per-sample JSONL into ``out_dir`` (fields of ``EvalConfig``); the second
writes a report folder (markdown table with paired tests against the first dir, PNG plots); its
``key=value`` arguments are fields of ``CompareConfig``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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


def _reward_model(args: argparse.Namespace) -> int:
    from mmalign.data.schema import RecordError
    from mmalign.evaluation.reward_bench import RewardEvalConfig, evaluate_reward_model

    cfg = load_config(RewardEvalConfig, args.config, args.overrides[1:])
    try:
        result = evaluate_reward_model(cfg)
    except RecordError as err:
        print(f"mmalign eval rm: bad input: {err}", file=sys.stderr)
        return 2
    print_metrics(result["metrics"])
    print(f"metrics and per-sample pairs written to {cfg.out_dir}")
    return 0


def _reward_matrix(args: argparse.Namespace) -> int:
    from mmalign.data.schema import RecordError
    from mmalign.evaluation.reward_bench import CrossSetConfig, cross_set_matrix

    cfg = load_config(CrossSetConfig, args.config, args.overrides[1:])
    try:
        cross_set_matrix(cfg)
    except RecordError as err:
        print(f"mmalign eval rm-matrix: bad input: {err}", file=sys.stderr)
        return 2
    print((Path(cfg.out_dir) / "matrix.md").read_text())
    return 0


# ``mmalign eval ACTION ...``: a first positional argument naming an action; anything else evaluates a model.
ACTIONS = {"compare": _compare, "annotator": _annotator, "bench": _bench, "rm": _reward_model,
           "rm-matrix": _reward_matrix}


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
                     "from the official files; 'rm ...' / 'rm-matrix ...' of reward models",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, "mmalign.evaluation.suite:EvalConfig")
    parser.set_defaults(func=_run)
