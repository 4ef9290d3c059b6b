"""On the lab base model, hiding the image (Eq. 6) turns BDHS answers into hallucinations.

Records whose image holds a trigger object but not its partner are sampled twice with the same seed, so every
record gets the same pivots and swaps: once with rho = 0 (image fully visible) and once with the paper's
rho = 0.99. The masked run must name an object the image lacks clearly more often (paired sign test over the
records where the two runs disagree), and so must the absent bias partner. The model is the shipped lab
base, on a fresh build of the lab it was trained on.

It needs a base that has learned its text-only prior: the shipped base is trained with 15 % of its SFT examples
image-hidden (``image_dropout``); an earlier base trained always with its image wrote degenerate text under
masking ("... No No No."). What masking adds depends on where the base's bias lives. On the shipped base
(label errors, half its captions with the partner right after its trigger) the absent partner goes 0.209 ->
0.475 from rho 0 to 0.99 (discordant 100 vs 25) and answers naming any absent object 0.277 -> 0.872 (discordant
173 vs 5) (2026-12-05, 47 s on 2 shared cores). The previous base, whose captions always put the partner after its
trigger, named it already with the image in view (0.454 -> 0.511, discordant 58 vs 42).
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
from mmalign.lab.world import all_objects
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


def _names_absent_object(answer: str, objects: list[str]) -> bool:
    return any(o in answer for o in all_objects() if o not in objects)


def _discordant(masked: list[bool], visible: list[bool]) -> tuple[int, int]:
    """(records only the masked run flags, records only the visible run flags)."""
    return sum(m and not v for m, v in zip(masked, visible)), sum(v and not m for m, v in zip(masked, visible))


def test_masking_makes_bdhs_answers_hallucinate(base):
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
    wrong = {rho: [_names_absent_object(r.answer, rec.meta["objects"]) for r, rec in zip(res, records)]
             for rho, res in runs.items()}
    partner_masked, partner_visible = _discordant(named[0.99], named[0.0])
    only_masked, only_visible = _discordant(wrong[0.99], wrong[0.0])
    print(f"absent partner named: rho=0 {np.mean(named[0.0]):.3f}, rho=0.99 {np.mean(named[0.99]):.3f} "
          f"(discordant {partner_masked} vs {partner_visible}); an absent object named: rho=0 "
          f"{np.mean(wrong[0.0]):.3f}, rho=0.99 {np.mean(wrong[0.99]):.3f} (discordant {only_masked} vs {only_visible})")
    assert np.mean(wrong[0.99]) >= np.mean(wrong[0.0]) + 0.2
    assert only_masked - only_visible > 2 * math.sqrt(only_masked + only_visible)  # sign test, z > 2
    assert partner_masked - partner_visible > 2 * math.sqrt(partner_masked + partner_visible)  # the bias, z > 2
