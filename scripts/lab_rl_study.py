"""Run the lab's RL study (``mmalign.lab.rl_study``): RLOO / GRPO / PPO vs offline DPO and Online-DPO.

    python scripts/lab_rl_study.py --config configs/lab_rl_study.yaml [key.sub=value ...]

Stages already done are skipped, so the same command resumes a killed study. Prints the summary (per-method
means over seeds, the reward-hacking table); the full report is in ``<out_dir>/report``.
"""

import argparse
import logging

from mmalign.config import load_config
from mmalign.lab.rl_study import RLStudyConfig, run_rl_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (RLStudyConfig)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_rl_study(load_config(RLStudyConfig, args.config, args.overrides))
    print(result["summary"])
    print(result["hacking"])
    print(f"report: {result['report']}")


if __name__ == "__main__":
    main()
