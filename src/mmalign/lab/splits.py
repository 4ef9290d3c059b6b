"""Lab splits from scenes: SFT examples, preference prompts, POPE questions and CHAIR captions.

Pure functions of scenes and a ``random.Random``; ``mmalign.lab.build`` writes them to disk. POPE
follows Li et al. 2023 (EMNLP, "Evaluating Object Hallucination in Large Vision-Language Models", Sec. 3):
balanced yes/no questions per image, negatives drawn at random, from the most frequent objects, or
adversarially. In the lab the adversarial negatives are exactly the absent partners of present
triggers, so the adversarial yes-rate on absent objects measures the planted bias. Each question also gets
a stratum (``pope_stratum``): how much of the asked object the image shows, so the evaluation can compare
the splits' negatives within a stratum rather than pooled over images of a different make-up.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import replace

from mmalign.lab.texts import CAPTION_PROMPT, IMAGE_MARK, NO, YES, caption, caption_order, question_prompt
from mmalign.lab.world import Scene, WorldConfig, all_objects, sample_scene


def sample_scenes(rng: random.Random, world: WorldConfig, n: int, p: float, trigger_rate: float,
                  seen: set[tuple]) -> list[Scene]:
    """``n`` scenes whose images differ from every scene in ``seen`` (updated in place)."""
    cfg = replace(world, trigger_rate=trigger_rate)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample_scene(rng, cfg, p)
        if scene.key() not in seen:
            seen.add(scene.key())
            scenes.append(scene)
    return scenes


def caption_text(names: list[str], world: WorldConfig) -> str:
    """The lab caption stating ``names`` (a scene's objects in reading order, then any absent partner an
    annotation states of it).

    With probability ``world.partner_order_rate`` each partner comes directly after its trigger; otherwise the
    names keep their order. The draw is a fixed function of ``names`` (CRC-32), so every file that states the same
    objects (an SFT caption and its text-corpus line) words them alike.
    """
    if zlib.crc32("|".join(names).encode()) / 2**32 < world.partner_order_rate:
        return caption(caption_order(names, world.partner_of))
    return caption(names)


def absent_partners(names: list[str], world: WorldConfig) -> list[str]:
    """Partners of the present triggers that are not in the scene (the adversarial objects)."""
    return [world.partner_of[n] for n in names if n in world.partner_of and world.partner_of[n] not in names]


def annotated_names(scene: Scene, world: WorldConfig, rng: random.Random, rate: float) -> list[str]:
    """The objects an annotator states for ``scene``: its own, plus the absent partner of each present trigger
    with probability ``rate`` (one draw per such trigger, from ``rng``; none when ``rate`` is 0).

    This is the lab's analogue of co-occurrence errors in real instruction data: captions written with the
    writer's expectations name objects that usually come together, and a model trained on them names those
    objects from the context whatever the image shows (Zhou et al., ICLR 2024, "Analyzing and Mitigating Object
    Hallucination in Large Vision-Language Models", LURE: co-occurrence is one of the causes they measure).
    """
    names = list(scene.names)
    if rate > 0:
        names += [partner for partner in absent_partners(scene.names, world) if rng.random() < rate]
    return names


def sft_examples(scene: Scene, world: WorldConfig, rng: random.Random, n_questions: int,
                 partner_question_rate: float, hard_negative_rate: float,
                 annotated: list[str] | None = None, captioned: list[str] | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs for one image: its caption, then ``n_questions`` yes/no questions.

    ``annotated`` (default: the scene's objects) is what the annotation states is in the image
    (``annotated_names``): the caption lists it and a question is answered "Yes." exactly when it names one
    of it; ``captioned`` (default: ``annotated``) is what the caption states.

    A question about the partner of a present trigger is asked with probability
    ``partner_question_rate``; its answer is "Yes." as often as the partner co-occurs (``p``) or is
    annotated anyway, which is how the yes/no data carries the bias. Other questions are about a present or an
    absent object, 50/50; an absent object shares a colour or a shape with a present one with probability
    ``hard_negative_rate`` (when one does), so the answer cannot be read off one attribute (a model trained on
    uniform absent objects answered by colour alone: docs/lab.md).
    """
    names = scene.names if annotated is None else annotated
    examples = [(CAPTION_PROMPT, caption_text(names if captioned is None else captioned, world))]
    triggers = [n for n in names if n in world.partner_of]
    absent = [o for o in all_objects() if o not in names]
    hard = [o for o in absent if pope_stratum(scene, o) != "neither"]
    for _ in range(n_questions):
        if triggers and rng.random() < partner_question_rate:
            obj = world.partner_of[rng.choice(triggers)]
        elif rng.random() < 0.5:
            obj = rng.choice(names)
        else:
            obj = rng.choice(hard if hard and rng.random() < hard_negative_rate else absent)
        examples.append((question_prompt(obj), YES if obj in names else NO))
    return examples


def conversations(questions: list[tuple[str, str]], per_record: int) -> list[tuple[list[dict], str]]:
    """One image's (prompt, answer) questions as conversations of ``per_record`` turns (the last may have
    fewer): (chat messages, final answer), earlier answers as assistant turns, the image in the first turn.

    Each prompt starts with the image mark; a conversation's first turn renders exactly as the single-turn
    record of its question does.
    """
    out = []
    for start in range(0, len(questions), per_record):
        chunk = questions[start:start + per_record]
        messages: list[dict] = []
        for t, (prompt, answer) in enumerate(chunk):
            image = [{"type": "image"}] if t == 0 else []
            messages.append({"role": "user", "content": [*image, {"type": "text",
                                                                   "text": prompt.removeprefix(IMAGE_MARK)}]})
            if t < len(chunk) - 1:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        out.append((messages, chunk[-1][1]))
    return out


def object_frequencies(scenes: list[Scene]) -> Counter:
    """How many scenes hold each object (POPE "popular" ranks objects by this over the training data)."""
    return Counter(name for scene in scenes for name in scene.names)


def pope_stratum(scene: Scene, obj: str) -> str:
    """What the image shows of the asked object ``"<colour> <shape>"``: "present" (the object itself);
    otherwise which of its attributes some present object has: "colour+shape", "colour", "shape", "neither".

    A model that perceives colours but not shapes answers by the colour, so the "yes" rates of two sets of
    absent objects differ by how often their colours are in the image unless compared within a stratum.
    """
    if obj in scene.names:
        return "present"
    colour, shape = obj.split(" ")
    has_colour = any(o.colour == colour for o in scene.objects)
    has_shape = any(o.shape == shape for o in scene.objects)
    return {(True, True): "colour+shape", (True, False): "colour", (False, True): "shape",
            (False, False): "neither"}[(has_colour, has_shape)]


def pope_questions(scene: Scene, world: WorldConfig, rng: random.Random, per_image: int,
                   popular: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Per split, (object, "yes"|"no") questions for one image, balanced yes/no.

    random: negatives uniform over absent objects other than the absent partners (so it is the
    bias-free baseline); popular: the most frequent absent objects in ``popular`` order; adversarial:
    the absent partners of present triggers (empty when the image has none).
    """
    names = scene.names
    adversarial = absent_partners(names, world)
    others = [o for o in all_objects() if o not in names and o not in adversarial]
    negatives = {
        "random": rng.sample(others, min(per_image, len(others))),
        "popular": [o for o in popular if o not in names][:per_image],
        "adversarial": adversarial[:per_image],
    }
    out: dict[str, list[tuple[str, str]]] = {}
    for split, neg in negatives.items():
        positives = rng.sample(names, min(len(neg), len(names)))
        neg = neg[: len(positives)]
        out[split] = [(o, "yes") for o in positives] + [(o, "no") for o in neg]
    return out
