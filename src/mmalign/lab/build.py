"""Build a ShapesWorld lab folder: images, SFT data, preference prompts, POPE and captioning sets.

Layout (the shared contract consumed by ``mmalign.evaluation`` and the samplers)::

    images/<image_id>.png   bias.json   vocab/synonyms.txt   lab.yaml (resolved LabConfig)
    sft_train.jsonl   pref_prompts.jsonl   vision_train.jsonl   text_train.jsonl   (PreferenceRecord JSONL)
    eval/pope.jsonl         eval/captions.jsonl

``text_train.jsonl`` holds the SFT captions as text alone (prompt without image), the corpus the language
model is pre-trained on. ``vision_train.jsonl`` is the vision pre-training set: images with no planted
co-occurrence (a real VLM's encoder is pre-trained on other, broader data than its instruction set), one caption
record each. The four image sets (sft / pref / eval / vision) are disjoint by construction (one ``seen`` set of
scene keys) and the build asserts it again on the written image hashes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from mmalign.config import config_hash, save_config
from mmalign.data.io import write_jsonl
from mmalign.data.record_files import write_records
from mmalign.data.schema import PreferenceRecord
from mmalign.lab.splits import (
    annotated_names, caption_text, conversations, object_frequencies, pope_questions, pope_stratum, sample_scenes,
    sft_examples,
)
from mmalign.lab.texts import CAPTION_PROMPT, IMAGE_MARK, question_prompt, synonyms
from mmalign.lab.world import Scene, WorldConfig, render

logger = logging.getLogger(__name__)


@dataclass
class SplitSizes:
    """Images per split."""

    sft: int = 6000  # SFT images (a caption and yes/no questions each)
    pref: int = 1000  # preference-prompt images
    eval: int = 500  # held-out evaluation images (POPE and captions)
    vision: int = 10000  # vision pre-training images (no planted bias)


@dataclass
class LabConfig:
    """One lab: the world, the bias strength per split, the SFT task mix and the split sizes.

    ``p`` is P(partner | trigger) in the SFT data; preference prompts and evaluation images use lower
    ``p_pref`` / ``p_eval`` and a higher ``eval_trigger_rate`` so that many show a trigger without its
    partner, where the bias can be measured and corrected. With ``partner_annotation_rate`` the SFT (and
    text) annotations of an image showing a trigger without its partner name the partner anyway at that rate
    (``annotated_names``), a bias in the labels rather than in the scenes; ``partner_caption_rate`` is the share
    of those annotations whose caption (and text-corpus line) names the partner too, the others stating it only
    in their yes/no answers; preference and evaluation records always state the true objects.
    ``pref_questions_per_image`` adds yes/no preference prompts (asked as in SFT) after each image's caption
    prompt, so alignment data can reach the yes/no answers POPE scores; they come from their own random stream
    and change no image or other record.
    """

    out_dir: str = "runs/lab"  # folder the lab is written to
    seed: int = 0  # seed of the scenes, texts and questions
    world: WorldConfig = field(default_factory=WorldConfig)
    sizes: SplitSizes = field(default_factory=SplitSizes)
    p: float = 0.9  # P(partner | trigger) in the SFT data: the planted bias
    p_pref: float = 0.5  # P(partner | trigger) on the preference-prompt images
    p_eval: float = 0.3  # P(partner | trigger) on the evaluation images
    eval_trigger_rate: float = 1.0  # share of evaluation images showing a trigger
    questions_per_image: int = 8  # SFT yes/no questions per image
    # > 0: an image's SFT yes/no questions as multi-turn records of this many turns (0: one record each)
    questions_per_turn_record: int = 4
    partner_question_rate: float = 0.3  # share of SFT questions asking about a partner
    # share of SFT questions about an absent object that ask one sharing a colour or shape with a present one
    hard_negative_rate: float = 1.0
    pope_per_image: int = 3  # POPE questions per evaluation image
    pref_questions_per_image: int = 0  # yes/no preference prompts per image after its caption prompt
    p_vision: float = 0.1  # P(partner | trigger) on the vision pre-training images (no planted bias)
    # P(an SFT annotation names the absent partner of a present trigger): co-occurrence errors in the data
    # (0.5: the shipped base's lab; with 0 a base that sees answers questions from the image, docs/lab.md)
    partner_annotation_rate: float = 0.5
    # P(the caption names an absent partner that its image's annotation states): below 1 the yes/no answers keep
    # their label errors while fewer captions carry them (the caption and question biases set apart)
    partner_caption_rate: float = 1.0

    def __post_init__(self) -> None:
        for name in ("p", "p_pref", "p_eval", "eval_trigger_rate", "partner_question_rate", "hard_negative_rate",
                     "p_vision", "partner_annotation_rate", "partner_caption_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.sizes.sft, self.sizes.pref, self.sizes.eval, self.sizes.vision) < 1 or self.pope_per_image < 1:
            raise ValueError("split sizes and pope_per_image must be >= 1")
        for name in ("pref_questions_per_image", "questions_per_turn_record"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def same_base_data(self, other: LabConfig) -> bool:
        """True when both labs give a base model the same training data (SFT, text and vision records): the
        settings of the preference and evaluation splits, drawn after them, may differ."""
        base = ("seed", "world", "p", "p_vision", "questions_per_image", "questions_per_turn_record",
                "partner_question_rate", "hard_negative_rate", "partner_annotation_rate", "partner_caption_rate")
        return (all(getattr(self, k) == getattr(other, k) for k in base)
                and (self.sizes.sft, self.sizes.vision) == (other.sizes.sft, other.sizes.vision))


def lab_scenes(cfg: LabConfig) -> dict[str, list[Scene]]:
    """The scenes of each split, all drawn from one seeded stream and never repeating an image."""
    rng, seen = random.Random(cfg.seed), set()
    world = cfg.world
    # the base model's training splits first, so the preference and evaluation splits can be resized freely
    return {
        "sft": sample_scenes(rng, world, cfg.sizes.sft, cfg.p, world.trigger_rate, seen),
        "vision": sample_scenes(rng, world, cfg.sizes.vision, cfg.p_vision, 0.0, seen),
        "pref": sample_scenes(rng, world, cfg.sizes.pref, cfg.p_pref, world.trigger_rate, seen),
        "eval": sample_scenes(rng, world, cfg.sizes.eval, cfg.p_eval, cfg.eval_trigger_rate, seen),
    }


def _write_images(out: Path, split: str, scenes: list[Scene], size: int) -> tuple[list[str], set[str]]:
    """Render and save one split's images; returns their relative paths and content hashes."""
    refs, hashes = [], set()
    for i, scene in enumerate(scenes):
        ref = f"images/{split}-{i:05d}.png"
        render(scene, size).save(out / ref)
        hashes.add(hashlib.sha256((out / ref).read_bytes()).hexdigest())
        refs.append(ref)
    if len(hashes) != len(scenes):
        raise AssertionError(f"split {split}: {len(scenes) - len(hashes)} duplicate images")
    return refs, hashes


def _annotations(cfg: LabConfig, scenes: list[Scene]) -> list[list[str]]:
    """Per SFT scene, the objects its annotations state (``annotated_names``), from their own random stream so
    that a rate of 0 leaves every other draw, and so every record, as without it."""
    rng = random.Random(cfg.seed + 4)
    return [annotated_names(scene, cfg.world, rng, cfg.partner_annotation_rate) for scene in scenes]


def _captioned(cfg: LabConfig, scenes: list[Scene], annotations: list[list[str]]) -> list[list[str]]:
    """Per SFT scene, the objects its caption states: its own plus each annotated absent partner kept with
    probability ``partner_caption_rate``, from a stream of its own (no draw at rate 1, so such a lab is as before)."""
    if cfg.partner_caption_rate == 1.0:
        return annotations
    rng = random.Random(cfg.seed + 5)
    return [scene.names + [n for n in annotated[len(scene.names):] if rng.random() < cfg.partner_caption_rate]
            for scene, annotated in zip(scenes, annotations)]


def _sft_records(cfg: LabConfig, scenes: list[Scene], refs: list[str],
                 annotations: list[list[str]], captioned: list[list[str]]) -> list[PreferenceRecord]:
    """Per image: the caption record (``sft-<i>-0``), then its yes/no questions, one record each
    (``sft-<i>-<j>``) or, with ``questions_per_turn_record``, as conversations (``sft-<i>-m<j>``) that train
    several answers per image encoding. ``meta.annotated``: what the answers state, when not the true objects;
    ``meta.captioned``: what the caption states, when not that."""
    rng = random.Random(cfg.seed + 1)
    records = []
    for i, (scene, ref, annotated, stated) in enumerate(zip(scenes, refs, annotations, captioned)):
        examples = sft_examples(scene, cfg.world, rng, cfg.questions_per_image, cfg.partner_question_rate,
                                 cfg.hard_negative_rate, annotated, stated)
        meta = {"objects": scene.names, "task": "caption"}
        if annotated != scene.names:
            meta["annotated"] = annotated
        if stated != annotated:
            meta["captioned"] = stated
        records.append(PreferenceRecord(id=f"sft-{i:05d}-0", images=[ref], prompt=examples[0][0],
                                        chosen=examples[0][1], rejected=[], source="shapesworld", meta=meta))
        questions = examples[1:]
        if cfg.questions_per_turn_record:
            named = [(f"m{j}", prompt, answer) for j, (prompt, answer)
                     in enumerate(conversations(questions, cfg.questions_per_turn_record))]
        else:
            named = [(str(j), prompt, answer) for j, (prompt, answer) in enumerate(questions, start=1)]
        records += [PreferenceRecord(id=f"sft-{i:05d}-{name}", images=[ref], prompt=prompt, chosen=answer, rejected=[],
                                     source="shapesworld", meta={**meta, "task": "yesno"})
                    for name, prompt, answer in named]
    return records


def _pref_records(cfg: LabConfig, scenes: list[Scene], refs: list[str]) -> list[PreferenceRecord]:
    """Per image: the caption prompt (id ``pref-<i>``), then its yes/no questions (``pref-<i>-q<j>``)."""
    rng = random.Random(cfg.seed + 3)
    records = []
    for i, (scene, ref) in enumerate(zip(scenes, refs)):
        meta = {"objects": scene.names, "task": "caption"}
        records.append(PreferenceRecord(id=f"pref-{i:05d}", images=[ref], prompt=CAPTION_PROMPT,
                                        chosen=caption_text(scene.names, cfg.world), rejected=[], source="shapesworld",
                                        meta=meta))
        if not cfg.pref_questions_per_image:
            continue
        examples = sft_examples(scene, cfg.world, rng, cfg.pref_questions_per_image, cfg.partner_question_rate,
                                 cfg.hard_negative_rate)
        for j, (prompt, answer) in enumerate(examples[1:]):
            records.append(PreferenceRecord(id=f"pref-{i:05d}-q{j}", images=[ref], prompt=prompt, chosen=answer,
                                            rejected=[], source="shapesworld", meta={**meta, "task": "yesno"}))
    return records


def _vision_records(cfg: LabConfig, scenes: list[Scene], refs: list[str]) -> list[PreferenceRecord]:
    """One caption record per image of the vision pre-training split (its labels: ``meta.objects``)."""
    return [PreferenceRecord(id=f"vision-{i:05d}", images=[ref], prompt=CAPTION_PROMPT,
                             chosen=caption_text(scene.names, cfg.world), rejected=[], source="shapesworld",
                             meta={"objects": scene.names, "task": "caption"})
            for i, (scene, ref) in enumerate(zip(scenes, refs))]


def _text_records(cfg: LabConfig, scenes: list[Scene], captioned: list[list[str]]) -> list[PreferenceRecord]:
    """The SFT images' captions (as written, ``captioned``) as text alone (no image): the language model's
    pre-training corpus."""
    return [PreferenceRecord(id=f"text-{i:05d}", images=[], prompt=CAPTION_PROMPT.removeprefix(IMAGE_MARK),
                             chosen=caption_text(stated, cfg.world), rejected=[], source="shapesworld",
                             meta={"objects": scene.names, "task": "text"})
            for i, (scene, stated) in enumerate(zip(scenes, captioned))]


def _eval_items(cfg: LabConfig, scenes: list[Scene], refs: list[str],
                sft_scenes: list[Scene]) -> tuple[list[dict], list[dict]]:
    """POPE questions (three splits, each with the ``stratum`` of ``pope_stratum``) and captioning items of
    the held-out images."""
    rng = random.Random(cfg.seed + 2)
    popular = [name for name, _ in object_frequencies(sft_scenes).most_common()]
    pope, captions = [], []
    for i, (scene, ref) in enumerate(zip(scenes, refs)):
        captions.append({"id": f"cap-{i:05d}", "image": ref, "prompt": CAPTION_PROMPT, "objects": scene.names})
        for split, questions in pope_questions(scene, cfg.world, rng, cfg.pope_per_image, popular).items():
            for k, (obj, label) in enumerate(questions):
                pope.append({"id": f"pope-{split}-{i:05d}-{k}", "image": ref, "question": question_prompt(obj),
                             "label": label, "split": split, "object": obj, "stratum": pope_stratum(scene, obj)})
    return pope, captions


def build_lab(cfg: LabConfig) -> Path:
    """Write the lab described by ``cfg`` into ``cfg.out_dir`` and return that folder."""
    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    (out / "vocab").mkdir(exist_ok=True)
    scenes = lab_scenes(cfg)
    refs, hashes = {}, {}
    for split, split_scenes in scenes.items():
        refs[split], hashes[split] = _write_images(out, split, split_scenes, cfg.world.image_size)
    for a, b in itertools.combinations(scenes, 2):
        if hashes[a] & hashes[b]:
            raise AssertionError(f"splits {a} and {b} share {len(hashes[a] & hashes[b])} images")
    provenance = {"sampler": "shapesworld", "seed": cfg.seed, "config_hash": config_hash(cfg)}
    annotations = _annotations(cfg, scenes["sft"])
    captioned = _captioned(cfg, scenes["sft"], annotations)
    write_records(out / "sft_train.jsonl", _sft_records(cfg, scenes["sft"], refs["sft"], annotations, captioned),
                  provenance)
    write_records(out / "pref_prompts.jsonl", _pref_records(cfg, scenes["pref"], refs["pref"]), provenance)
    write_records(out / "vision_train.jsonl", _vision_records(cfg, scenes["vision"], refs["vision"]), provenance)
    write_records(out / "text_train.jsonl", _text_records(cfg, scenes["sft"], captioned), provenance)
    pope, captions = _eval_items(cfg, scenes["eval"], refs["eval"], scenes["sft"])
    write_jsonl(out / "eval" / "pope.jsonl", pope)
    write_jsonl(out / "eval" / "captions.jsonl", captions)
    (out / "vocab" / "synonyms.txt").write_text("".join(", ".join(row) + "\n" for row in synonyms()))
    bias = {"pairs": cfg.world.pairs, "p": cfg.p, "p_pref": cfg.p_pref, "p_eval": cfg.p_eval,
            "partner_annotation_rate": cfg.partner_annotation_rate, "partner_caption_rate": cfg.partner_caption_rate,
            "trigger_rate": cfg.world.trigger_rate, "eval_trigger_rate": cfg.eval_trigger_rate}
    (out / "bias.json").write_text(json.dumps(bias, indent=2) + "\n")
    save_config(cfg, out, "lab.yaml")
    logger.info("built lab in %s: %s images", out, {k: len(v) for k, v in scenes.items()})
    return out
