"""Where sharing the prefix pays: mmalign plain vs shared-prefix (packed; prompt KV cache) DPO steps over image tokens and K rejected.

Each point runs ``bench_dpo``'s ``plain``, ``shared`` and ``cache`` variants side by side (separate processes, same model,
same pairs, interleaved). Image tokens per record go 64 -> 2,880 (LLaVA-1.5 has 576 per image, LLaVA-NeXT AnyRes
up to 2,880 = 5 x 576: here 1 image of 64 / 256 / 576 tokens, 2 or 5 images of 576); K rejected answers per
record go 1 -> 4 at 576 image tokens. Prompt ~32 text tokens, answers ~64 tokens.

    python benchmarks/bench_sweep.py --out bench_sweep.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_dpo import compare, parse_args  # noqa: E402

# (image tokens per image, images per record, K rejected)
POINTS = [(64, 1, 1), (256, 1, 1), (576, 1, 1), (576, 2, 1), (576, 5, 1), (576, 1, 2), (576, 1, 4)]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out = argv[i + 1]
        del argv[i: i + 2]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = ["| image tokens | K | plain pairs/s | shared pairs/s | cache pairs/s | shared / plain (best step) | "
            "cache / plain (best step) | GFLOP plain / shared / cache | RSS growth MiB plain / shared / cache |",
            "|---" * 9 + "|"]
    points = []
    for tokens, images, k in POINTS:
        args = parse_args(["--image-tokens", str(tokens), "--images", str(images), "--k", str(k),
                           "--batch", "2", "--steps", "2", "--rounds", "1", "--threads", "1", *argv])
        res = compare(args, ["plain", "shared", "cache"])["results"]
        points.append({"image_tokens": tokens * images, "k": k, **res})
        speed = {v: res[v]["pairs_per_s"] for v in res}
        best = {v: res[v]["pairs_per_s_best_step"] for v in res}
        gflop = " / ".join(f"{res[v]['flops_per_step'] / 1e9:.1f}" for v in res)
        growth = " / ".join(f"{res[v]['peak_rss_mib'] - res[v]['rss_before_steps_mib']:.0f}" for v in res)
        rows.append(f"| {tokens * images} | {k} | {speed['plain']:.3f} | {speed['shared']:.3f} | {speed['cache']:.3f} | "
                    f"{speed['shared'] / speed['plain']:.2f} ({best['shared'] / best['plain']:.2f}) | "
                    f"{speed['cache'] / speed['plain']:.2f} ({best['cache'] / best['plain']:.2f}) | {gflop} | "
                    f"{growth} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if out:
        Path(out).write_text(json.dumps({"command": " ".join(["bench_sweep.py", *sys.argv[1:]]),
                                         "points": points, "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
