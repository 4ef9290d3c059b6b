"""What kind of object errors captions make in the lab: right colour with a wrong shape, or a colour not in the image.

For each argument: an evaluation folder (its ``samples_captions.jsonl``: the model's captions of held-out images)
or a preference file (its caption records' last rejected answer -- the BDHS one in a BDHS file -- truth from
``meta.objects``). Mentions are found with the lab's CHAIR vocabulary (``<lab>/vocab/synonyms.txt``, the
evaluation's own matcher); a lab class is "<colour> <shape>". Columns per caption: mentions, hallucinated mentions, distinct correct objects; then the
hallucinated mentions split by whether their colour is in the image (and then whether their shape is).

    python scripts/lab_error_types.py LAB_DIR RUN/eval/bdhs_s0 RUN/seed_0/pairs/bdhs.jsonl [...]
"""

import sys
from collections import Counter
from pathlib import Path

from mmalign.data.record_files import read_records
from mmalign.evaluation.chair import chair_record, load_synonyms
from mmalign.evaluation.suite import load_run


def captions(path: Path, lab_dir: Path) -> list[tuple[str, str, list[str]]]:
    """(id, caption, true objects) of an evaluation folder or of a preference file's caption records (images
    relative to the lab folder, as the demo writes them)."""
    if path.is_dir():
        return [(r["id"], r["answer"], r["truth"]) for r in load_run(str(path))[2]]
    return [(r.id, r.rejected[-1], r.meta["objects"]) for r in read_records(path, data_root=lab_dir)
            if r.meta.get("task") == "caption" and r.rejected]


def error_types(rows: list[dict]) -> Counter:
    """Hallucinated mentions by (colour in image, shape in image); a class is '<colour> <shape>'."""
    kinds: Counter = Counter()
    for r in rows:
        colours = {t.split()[0] for t in r["truth"]}
        shapes = {t.split()[-1] for t in r["truth"]}
        for cls in r["hallucinated"]:
            kinds[(cls.split()[0] in colours, cls.split()[-1] in shapes)] += 1
    return kinds


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    lab_dir = Path(sys.argv[1])
    vocab = load_synonyms(lab_dir / "vocab" / "synonyms.txt")
    print("| source | captions | mentions | hallucinated | correct | right colour, shape elsewhere in image "
          "| right colour, shape absent | colour absent |\n|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[2:]:
        rows = [chair_record(i, text, truth, vocab) for i, text, truth in captions(Path(arg), lab_dir)]
        n, kinds = len(rows), error_types(rows)
        per = [sum(len(r[k]) for r in rows) / n for k in ("mentions", "hallucinated", "correct")]
        absent = kinds[(False, True)] + kinds[(False, False)]
        print(f"| {arg} | {n} | {per[0]:.2f} | {per[1]:.2f} | {per[2]:.2f} | {kinds[(True, True)]} "
              f"| {kinds[(True, False)]} | {absent} |")


if __name__ == "__main__":
    main()
