"""The BDHS similarity filter: a text's embedding is that of the text encoded alone, bit for bit, whatever
other texts share the call (a record's accepted iteration must not depend on its batch), and each text is
embedded once."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.sampling.similarity import SentenceSimilarity

# Different token lengths: encoded together with padding, these would perturb each other's last digits.
TEXTS = [
    "There is a red circle.",
    "There is a green triangle and a yellow cross on the left of the image.",
    "No, there is no blue square in the image.",
    "There is a red circle.",
]
REFERENCE = "There is a red circle and a blue square."


@pytest.fixture(scope="module")
def similarity() -> SentenceSimilarity:
    return SentenceSimilarity("", "cpu")


def _alone(similarity: SentenceSimilarity, text: str) -> np.ndarray:
    return similarity.model.encode([text], batch_size=1, convert_to_numpy=True, normalize_embeddings=True,
                                   show_progress_bar=False)[0].astype(np.float64)


def test_similarity_equals_texts_encoded_alone_whatever_the_batch(similarity):
    similarity.cache.clear()
    together = similarity(TEXTS, [REFERENCE] * len(TEXTS))
    expected = [float(np.sum(_alone(similarity, t) * _alone(similarity, REFERENCE))) for t in TEXTS]
    assert together.tolist() == expected
    for text, phi in zip(TEXTS, together):
        similarity.cache.clear()
        assert similarity([text], [REFERENCE])[0] == phi
    similarity.cache.clear()
    assert similarity(TEXTS[::-1], [REFERENCE] * len(TEXTS)).tolist() == expected[::-1]


def test_each_text_is_embedded_once(similarity, monkeypatch):
    similarity.cache.clear()
    encoded = []
    encode = similarity.model.encode
    monkeypatch.setattr(similarity.model, "encode", lambda texts, **kw: encoded.extend(texts) or encode(texts, **kw))
    similarity(TEXTS[:2], [REFERENCE] * 2)
    similarity(TEXTS[2:], [REFERENCE] * 2)
    assert sorted(encoded) == sorted(set(TEXTS) | {REFERENCE})
