"""``mmalign train rloo | grpo | ppo``: RL on a VLM with a reward (lab oracle, reward model or judge).

    mmalign train rloo --config configs/lab_rloo.yaml run.seed=1
    mmalign train grpo --config configs/lab_grpo.yaml
    mmalign train ppo --config configs/lab_ppo.yaml value.path=runs/lab_rm

``rloo`` and ``grpo`` run ``mmalign.trainers.rloo.RLOOConfig`` (the subcommand sets ``advantage``); ``ppo``
runs ``mmalign.trainers.ppo.PPOConfig``. Key sections: ``rollout`` (k, temperature, max_new_tokens),
``reward`` (``source`` = an annotator config: oracle / reward_model / vlm_judge / api_judge; ``normalize``,
``length_penalty``, ``oracle_synonyms`` to log the lab oracle beside a learned reward), ``kl`` (beta,
estimator k1 / k3), ``update_epochs``, ``minibatches``, ``clip``; PPO adds ``value``. Run under
``accelerate launch`` for several processes; ``run.resume=true`` continues from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmalign.cli.main import add_config_args

logger = logging.getLogger(__name__)

HELP = {"rloo": "RLOO: k samples per prompt, leave-one-out baseline, KL in the reward (Apple Sec. 5.5)",
        "grpo": "GRPO: k samples per prompt, group-normalised advantages, KL in the reward",
        "ppo": "PPO: scalar-head critic, GAE, clipped ratio and value loss (Apple Sec. 5.5)"}


def _train(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.data.schema import RecordError

    if args.rl_recipe == "ppo":
        from mmalign.trainers.ppo import PPOConfig, train_ppo

        cfg, train = load_config(PPOConfig, args.config, args.overrides), train_ppo
    else:
        from mmalign.trainers.rloo import RLOOConfig, train_rloo

        cfg = load_config(RLOOConfig, args.config, [f"advantage={args.rl_recipe}", *args.overrides])
        train = train_rloo
    try:
        out = train(cfg)
    except RecordError as err:
        print(f"mmalign train {args.rl_recipe}: bad input: {err}", file=sys.stderr)
        return 2
    logger.info("wrote %s", out)
    return 0


def register_rl(train_subparsers: argparse._SubParsersAction) -> None:
    """Add ``rloo``, ``grpo`` and ``ppo`` to ``mmalign train``."""
    for name, text in HELP.items():
        parser = train_subparsers.add_parser(name, help=text, description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(parser, "mmalign.trainers.ppo:PPOConfig" if name == "ppo" else "mmalign.trainers.rloo:RLOOConfig")
        parser.set_defaults(func=_train, rl_recipe=name)
