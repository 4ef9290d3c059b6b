"""BDHS similarity filter: embedding texts one at a time (what the filter does) against batched encoding.

    python benchmarks/bench_similarity.py [--input FILE] [--records N] [--embedder DIR]

Embeds the distinct reference answers (``chosen``) of the first N records of a record file (default: the
benchmark's synthetic 3-sentence captions) with the filter's model, four ways, in one process:
``encode`` of one text per call (the filter), the bare module forward of one text (tokenize + the model's
own modules under inference_mode, i.e. ``encode`` without its per-call overhead), padded batches of 32, and
batches of texts with equal token counts (no padding). Prints seconds, ms per text, and for the batched
ways the largest difference from one-at-a-time and whether every embedding is bitwise equal to it.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from mmalign.data.record_files import read_records
from mmalign.sampling.similarity import SentenceSimilarity

KW = dict(convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)


def bare_forward(model, text: str) -> np.ndarray:
    with torch.inference_mode():
        features = model(model.preprocess([text]))
        return torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1)[0].numpy()


def equal_length_batches(model, texts: list[str]) -> np.ndarray:
    groups = defaultdict(list)
    for i, text in enumerate(texts):
        groups[len(model.tokenizer(text)["input_ids"])].append(i)
    out = [None] * len(texts)
    for idx in groups.values():
        for i, vector in zip(idx, model.encode([texts[i] for i in idx], batch_size=len(idx), **KW)):
            out[i] = vector
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="record file whose chosen answers are embedded (default: synthetic)")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--embedder", default="", help="sentence-transformers folder (default: the filter's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.input:
        texts = [r.chosen for r in read_records(args.input)[: args.records]]
    else:
        from bench_bdhs import synthetic
        texts = [r.chosen for r in synthetic(args.records)[0]]
    texts = list(dict.fromkeys(texts))
    model = SentenceSimilarity(args.embedder, "cpu").model
    model.encode(texts[:2], batch_size=1, **KW)  # warm-up
    ways = {
        "encode, one text per call": lambda: model.encode(texts, batch_size=1, **KW),
        "bare forward, one text per call": lambda: np.stack([bare_forward(model, t) for t in texts]),
        "encode, padded batches of 32": lambda: model.encode(texts, batch_size=32, **KW),
        "encode, equal-length batches": lambda: equal_length_batches(model, texts),
    }
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    print(f"{len(texts)} texts, {np.mean(lengths):.1f} tokens on average, {len(set(lengths))} distinct lengths")
    alone = None
    for name, run in ways.items():
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        alone = out if alone is None else alone
        print(f"{name:33s} {seconds:6.2f} s ({1e3 * seconds / len(texts):5.1f} ms/text); max |diff| "
              f"{np.abs(out - alone).max():.1e}; bitwise equal: {np.array_equal(out, alone)}")


if __name__ == "__main__":
    main()
