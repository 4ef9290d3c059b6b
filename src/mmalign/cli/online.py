"""``mmalign train online-dpo | mixed-dpo | online-bdhs`` and ``mmalign eval annotator``.

    mmalign train online-dpo --config configs/lab_online.yaml run.seed=1
    mmalign train mixed-dpo --config configs/lab_mixed.yaml mix_p=0.5
    mmalign eval annotator data=held_out_pairs.jsonl annotator.kind=api_judge annotator.endpoint.base_url=...

The training config is ``mmalign.trainers.online.OnlineConfig`` (the subcommand sets ``mode``); the
annotator evaluation config is ``mmalign.evaluation.annotators.AnnotatorEvalConfig``. Wiring (cli owners):
``register_online(train_subparsers)`` inside ``mmalign.cli.train.register``; ``mmalign eval annotator ...``
by dispatching to ``run_annotator_eval(args.config, args.overrides[1:])`` in ``mmalign.cli.eval``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmalign.cli.main import add_config_args, print_metrics

logger = logging.getLogger(__name__)

MODES = {"online-dpo": "online", "mixed-dpo": "mixed", "online-bdhs": "online_bdhs"}


def _train(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.data.collate import SequenceTooLong
    from mmalign.data.schema import RecordError
    from mmalign.trainers.online import OnlineConfig, train_online

    cfg = load_config(OnlineConfig, args.config, [f"mode={MODES[args.online_recipe]}", *args.overrides])
    try:
        out = train_online(cfg)
    except (RecordError, SequenceTooLong) as err:
        print(f"mmalign train {args.online_recipe}: bad input: {err}", file=sys.stderr)
        return 2
    logger.info("wrote %s", out)
    return 0


def run_annotator_eval(config: str | None, overrides: list[str]) -> int:
    """``mmalign eval annotator [--config x.yaml] key=value ...``: for ``mmalign.cli.eval`` to dispatch to when
    its first positional argument is ``annotator`` (as it does for ``compare``)."""
    from mmalign.config import load_config
    from mmalign.data.schema import RecordError
    from mmalign.evaluation.annotators import AnnotatorEvalConfig, evaluate_annotator

    cfg = load_config(AnnotatorEvalConfig, config, overrides)
    try:
        metrics = evaluate_annotator(cfg)
    except (RecordError, ValueError) as err:
        print(f"mmalign eval annotator: error: {err}", file=sys.stderr)
        return 1
    print_metrics(metrics)
    print(f"metrics and per-record verdicts written to {cfg.out_dir}")
    return 0


def register_online(train_subparsers: argparse._SubParsersAction) -> None:
    """Add ``online-dpo``, ``mixed-dpo`` and ``online-bdhs`` to ``mmalign train``."""
    helps = {"online-dpo": "Online-DPO: sample k answers per prompt, annotate, update (Apple Sec. 2.3)",
             "mixed-dpo": "Mixed-DPO: per example the offline pair with probability p, else an online pair (Eq. 4)",
             "online-bdhs": "Online-BDHS: BDHS rejected answers from the current policy, Eq. 5 averaging"}
    for name, text in helps.items():
        parser = train_subparsers.add_parser(name, help=text, description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(parser, "mmalign.trainers.online:OnlineConfig")
        parser.set_defaults(func=_train, online_recipe=name)

