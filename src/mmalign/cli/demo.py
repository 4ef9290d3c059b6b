"""``mmalign demo``: the ShapesWorld demo (lab, base model, DPO on lab pairs, evaluation, report)."""

from __future__ import annotations

import argparse

from mmalign.cli.main import add_config_args


def _run(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.recipes.demo import DemoConfig, headline_table, run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    result = run_demo(cfg)
    print(headline_table(result["comparison"]))
    if len(cfg.seeds) > 1:
        print(result["summary"])
    elif result["vs_control"]:
        print("Against the SFT-only control (the same training with the preference term off):")
        print(headline_table(result["vs_control"][cfg.seeds[0]]))
    print("value (change vs the baseline row); * = the paired bootstrap interval excludes 0. 'less hallucination' "
          "needs a hallucination measure down and POPE TP rate and recall within 2 points (docs/evaluation.md)")
    print(f"report: {result['report']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="ShapesWorld demo: base model vs DPO on corrupted and BDHS pairs and an SFT-only control, "
                     "with CIs (DemoConfig)")
    add_config_args(parser, "mmalign.recipes.demo:DemoConfig")
    parser.set_defaults(func=_run)
