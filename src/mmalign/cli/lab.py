"""``mmalign lab build``, ``pretrain``, ``rl-study`` and ``rm-study``: the ShapesWorld lab, its base model,
the RL study and the reward-model study (``mmalign.recipes.rm_study``)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mmalign.cli.main import add_config_args

logger = logging.getLogger(__name__)


def _build(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.lab.build import LabConfig, build_lab

    out = build_lab(load_config(LabConfig, args.config, args.overrides))
    logger.info("lab written to %s", out)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.recipes.pretrain import PretrainConfig, pretrain_base

    out = pretrain_base(load_config(PretrainConfig, args.config, args.overrides))
    logger.info("base model in %s (evaluation in %s)", out, out / "eval")
    return 0


def _rl_study(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.recipes.rl_study import RLStudyConfig, run_rl_study

    result = run_rl_study(load_config(RLStudyConfig, args.config, args.overrides))
    print(result["summary"])
    print(result["hacking"])
    logger.info("report: %s", result["report"])
    return 0


def _rm_study(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.recipes.rm_study import RMStudyConfig, run_rm_study

    result = run_rm_study(load_config(RMStudyConfig, args.config, args.overrides))
    print(result["table"])
    print("\n".join(result["matrices"].values()))
    print(f"report: {result['report']}")
    return 0


def _action(sub: argparse._SubParsersAction, name: str, help: str, target: str, func: Any) -> None:
    parser = sub.add_parser(name, help=help)
    add_config_args(parser, target)
    parser.set_defaults(func=func)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lab", help="build the ShapesWorld lab; pre-train its base model")
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    _action(sub, "build", "write images, SFT data, preference prompts and eval sets (LabConfig)",
            "mmalign.lab.build:LabConfig", _build)
    _action(sub, "pretrain", "build the lab if needed, SFT the base model, evaluate it (PretrainConfig; cached when "
            "already done)", "mmalign.recipes.pretrain:PretrainConfig", _pretrain)
    _action(sub, "rl-study", "RLOO / GRPO / PPO vs offline DPO and Online-DPO in the lab (RLStudyConfig; stages "
            "already done are skipped)", "mmalign.recipes.rl_study:RLStudyConfig", _rl_study)
    _action(sub, "rm-study", "reward models on every lab pair source (cross-set matrix) and MM-DPO with their "
            "margins vs DPO vs DPO + SFT (RMStudyConfig)", "mmalign.recipes.rm_study:RMStudyConfig", _rm_study)
