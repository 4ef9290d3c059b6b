"""POPE "yes" rates on absent objects, split by whether the asked object's colour / shape is in the image.

ShapesWorld objects are colour x shape, so a model that sees colours but not shapes answers "yes" to any
absent object whose colour is present. Comparing the absent bias partner with random absent objects *within
the same stratum* separates the language prior from that perceptual shortcut. Reads an evaluation folder's
per-sample records (``samples_pope.jsonl`` and, for the image's objects, ``samples_captions.jsonl``).

    python scripts/lab_pope_strata.py RUN/eval [RUN2/eval ...]
"""

import collections
import json
import sys
from pathlib import Path


def strata(eval_dir: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """{(split, stratum): (yes answers, questions)} over POPE questions whose truth is "no"."""
    truth = {r["image"]: r["truth"] for r in map(json.loads, open(eval_dir / "samples_captions.jsonl"))}
    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in map(json.loads, open(eval_dir / "samples_pope.jsonl")):
        if r["truth"] != "no" or r["image"] not in truth:
            continue
        colour, shape = r["object"].split()
        present = [o.split() for o in truth[r["image"]]]
        key = ("colour" if any(c == colour for c, _ in present) else "") + \
              ("+shape" if any(s == shape for _, s in present) else "")
        counts[(r["split"], key.lstrip("+") or "neither")][0] += r["parsed"] == "yes"
        counts[(r["split"], key.lstrip("+") or "neither")][1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def main() -> None:
    print("| eval | split | colour present | shape present | n | yes-rate |\n|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        for (split, key), (yes, n) in sorted(strata(Path(arg)).items()):
            colour, shape = "colour" in key, "shape" in key
            print(f"| {arg} | {split} | {'yes' if colour else 'no'} | {'yes' if shape else 'no'} | {n} | "
                  f"{yes / n:.3f} |")


if __name__ == "__main__":
    main()
