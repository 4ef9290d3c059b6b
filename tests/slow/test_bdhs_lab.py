"""On the lab base model, hiding the image (Eq. 6) pushes BDHS answers toward the lab's bias partner.

Records whose image holds a trigger object but not its partner are sampled twice with the same seed, so
every record gets the same pivots and swaps: once with rho = 0 (image fully visible) and once with the
paper's rho = 0.99. The masked run must name the absent partner clearly more often (paired sign test over
the records where the two runs disagree). The model is the shipped lab base, on a fresh build of the lab it
was trained on.

It needs a base that has learned its text-only prior: the shipped base is trained with 15 % of its SFT examples
image-hidden (``image_dropout``). An earlier base trained always with its image wrote degenerate text under
masking ("... No No No.") and named the absent partner less often (0.18 at rho 0, 0.10 at 0.99); the shipped
128 px base names it 0.124 at rho 0 and 0.504 at rho 0.99 (discordant records 116 vs 9; 65 s on 2 shared cores,
2026-12-04).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.data.images import open_image
from mmalign.data.record_files import read_records
from mmalign.lab.build import build_lab
from mmalign.recipes.pretrain import BASE_DIR, shipped_base_lab
from mmalign.models.loading import load_vlm
from mmalign.sampling.bdhs import BDHSConfig, bdhs_sample
from mmalign.sampling.masked import MaskedRow, encode_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(lab folder, base model folder): the shipped base and its lab."""
    lab = dataclasses.replace(shipped_base_lab(), out_dir=str(tmp_path_factory.mktemp("lab")))
    return build_lab(lab), BASE_DIR


def _names_absent_partner(answer: str, objects: list[str], pairs: list[list[str]]) -> bool:
    absent = [p for t, p in pairs if t in objects and p not in objects]
    return any(p in answer for p in absent)


def test_masking_shifts_bdhs_answers_toward_the_bias_partner(base):
    lab, model_dir = base
    model, processor = load_vlm(model_dir)
    pairs = json.loads((lab / "bias.json").read_text())["pairs"]
    records = [r for r in read_records(lab / "pref_prompts.jsonl")
               if any(t in r.meta["objects"] and p not in r.meta["objects"] for t, p in pairs)]
    assert len(records) >= 100
    images = [[open_image(ref, lab) for ref in r.images] for r in records]
    # Precondition: the base model looks at its image (the colour it names next depends on the picture).
    rows = [MaskedRow(records[0].prompt, im, "There is a", np.ones(0, bool), 0) for im in images[:2]]
    with torch.no_grad():
        a, b = (model(**encode_rows(processor, [row])[0]).logits[0, -1].softmax(-1) for row in rows)
    assert (a - b).abs().sum() / 2 > 0.05, "the lab base model ignores its image"
    no_filter = lambda texts, refs: np.zeros(len(texts))  # noqa: E731  (one guided iteration, no resampling)
    runs = {rho: bdhs_sample(model, processor, records, images, BDHSConfig(rho=rho, n_iter=1), no_filter)
            for rho in (0.0, 0.99)}
    named = {rho: [_names_absent_partner(r.answer, rec.meta["objects"], pairs) for r, rec in zip(res, records)]
             for rho, res in runs.items()}
    only_masked = sum(m and not v for m, v in zip(named[0.99], named[0.0]))
    only_visible = sum(v and not m for m, v in zip(named[0.99], named[0.0]))
    rates = {rho: float(np.mean(v)) for rho, v in named.items()}
    print(f"absent partner named: rho=0 {rates[0.0]:.3f}, rho=0.99 {rates[0.99]:.3f}; "
          f"discordant {only_masked} vs {only_visible}")
    assert rates[0.99] >= rates[0.0] + 0.05
    assert only_masked - only_visible > 2 * math.sqrt(only_masked + only_visible)  # sign test, z > 2
