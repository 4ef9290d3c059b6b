"""POPE "yes" rates on absent objects per split and stratum, several evaluation runs side by side.

The stratum is the POPE item's ``stratum`` field, carried into each run's ``samples_pope.jsonl`` (in the lab:
which of the asked object's colour / shape is in the image, ``mmalign.lab.splits.pope_stratum``). The
evaluation itself reports the absent-partner and random rates per stratum and the matched gap
(``pope_bias/stratum/<label>/*``, ``pope_bias/yes_rate_gap_matched``); this table adds the popular split.
Rates are the POPE yes-ratio with its bootstrap 95% interval over the questions of the cell.

    python scripts/lab_pope_strata.py RUN/eval [RUN2/eval ...]
"""

import sys
from collections import defaultdict

from mmalign.evaluation.pope import POPE_METRICS, pope_columns
from mmalign.evaluation.stats import bootstrap
from mmalign.evaluation.suite import load_run


def strata(eval_dir: str) -> dict[tuple[str, str], list[str]]:
    """{(split, stratum): parsed answers} over the POPE questions whose truth is "no"."""
    _, pope, _ = load_run(eval_dir)
    answers: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in pope:
        if r.get("stratum") is None:
            sys.exit(f"{eval_dir}: POPE samples without a stratum; evaluate on a lab built with strata")
        if r["truth"] == "no":
            answers[(r["split"], r["stratum"])].append(r["parsed"])
    return answers


def main() -> None:
    print("| eval | split | stratum | n | yes-rate [95% CI] |\n|---|---|---|---|---|")
    for eval_dir in sys.argv[1:]:
        for (split, stratum), parsed in sorted(strata(eval_dir).items()):
            m = bootstrap(pope_columns(parsed, ["no"] * len(parsed)), {"yes": POPE_METRICS["yes_ratio"]})["yes"]
            print(f"| {eval_dir} | {split} | {stratum} | {m.n} | {m.value:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}] |")


if __name__ == "__main__":
    main()
