"""ShapesWorld scenes: 1-4 coloured shapes on a 2x2 grid, rendered to small RGB images (128 x 128 by default).

A scene is a tuple of objects (colour x shape, one per grid cell, jittered position and size). The
**language bias** lives in how scenes are sampled: each bias pair ``(trigger, partner)`` makes the partner
co-occur with its trigger with probability ``p`` (the lab's analogue of the object co-occurrence behind
POPE's adversarial split, Li et al. 2023). Everything is a pure function of a ``random.Random``, so a
seed fixes every scene and pixel.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUND = (245, 245, 240)


def all_objects() -> list[str]:
    """Canonical object names, ``"<colour> <shape>"``, in a fixed order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``cell`` in 0..3 (reading order on the 2x2 grid), centre ``(cx, cy)`` and ``size`` in px."""

    colour: str
    shape: str
    cell: int
    cx: int
    cy: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    @property
    def names(self) -> list[str]:
        """Object names in reading order (grid cell order)."""
        return [o.name for o in sorted(self.objects, key=lambda o: o.cell)]

    def key(self) -> tuple:
        """Identity of the rendered image (used to keep splits disjoint)."""
        return tuple(sorted((o.name, o.cell, o.cx, o.cy, o.size) for o in self.objects))


@dataclass
class WorldConfig:
    """Scene statistics, and the order captions list a scene in. ``pairs`` are ``[trigger, partner]`` names;
    ``p`` is P(partner | trigger)."""

    image_size: int = 128  # square image side in pixels
    min_objects: int = 1  # fewest objects per image
    max_objects: int = 4  # most objects per image (one per grid cell, at most 4)
    min_size: int = 28  # smallest object side in pixels
    max_size: int = 44  # largest object side in pixels (at most half the image)
    pairs: list[list[str]] = field(  # [trigger, partner] bias pairs
        default_factory=lambda: [["red circle", "blue square"], ["green triangle", "yellow cross"],
                                 ["yellow circle", "green square"]]
    )
    trigger_rate: float = 0.6  # share of images showing a trigger
    # share of captions that move a partner (present, or stated though absent) directly after its trigger; the
    # others list the scene in reading order and a stated absent partner last (mmalign.lab.splits.caption_text).
    # 0.5 keeps the caption bias and the recall of a base that sees (at 1 the partner's slot costs recall,
    # at 0 the caption bias is gone: docs/lab.md, "The caption order is what costs recall")
    partner_order_rate: float = 0.5

    def __post_init__(self) -> None:
        names = set(all_objects())
        for pair in self.pairs:
            if len(pair) != 2 or not set(pair) <= names:
                raise ValueError(f"bias pair {pair} must be two of {sorted(names)}")
        roles = [t for t, _ in self.pairs] + [p for _, p in self.pairs]
        if len(set(roles)) != len(roles):
            raise ValueError(f"bias pairs {self.pairs}: an object may be in at most one pair, once")
        if not 0.0 <= self.partner_order_rate <= 1.0:
            raise ValueError(f"partner_order_rate must be in [0, 1], got {self.partner_order_rate}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError("need 1 <= min_objects <= max_objects <= 4 (one object per grid cell)")
        if not 0 < self.min_size <= self.max_size <= self.image_size // 2:
            raise ValueError("object sizes must fit a grid cell (<= image_size / 2)")

    @property
    def partner_of(self) -> dict[str, str]:
        return {t: p for t, p in self.pairs}


def sample_names(rng: random.Random, cfg: WorldConfig, p: float) -> list[str]:
    """Draw the object names of one scene so that P(partner present | trigger present) = ``p`` exactly.

    A trigger is placed first with probability ``cfg.trigger_rate``; whenever a trigger enters the scene
    its partner is added (prob. ``p``) or banned. Fillers may be triggers only while a slot stays free
    for the partner, and a trigger is never added after its partner, so every trigger's partner decision
    is the coin flip and nothing else.
    """
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    partner_of = cfg.partner_of
    chosen: list[str] = []
    banned: set[str] = set()

    def add(name: str) -> None:
        chosen.append(name)
        if name in partner_of:
            if rng.random() < p:
                chosen.append(partner_of[name])
            else:
                banned.add(partner_of[name])

    if n >= 2 and rng.random() < cfg.trigger_rate:
        add(rng.choice(sorted(partner_of)))
    while len(chosen) < n:
        pool = [
            o for o in all_objects()
            if o not in chosen and o not in banned
            and not (o in partner_of and (len(chosen) > n - 2 or partner_of[o] in chosen))
        ]
        add(rng.choice(pool))
    return chosen


def sample_scene(rng: random.Random, cfg: WorldConfig, p: float) -> Scene:
    """One scene: names from ``sample_names``, each in its own random grid cell, jittered inside it."""
    names = sample_names(rng, cfg, p)
    cells = rng.sample(range(4), len(names))
    half = cfg.image_size // 2
    objects = []
    for name, cell in zip(names, cells):
        colour, shape = name.split(" ")
        size = rng.randint(cfg.min_size, cfg.max_size)
        slack = half - size  # room to jitter while staying inside the cell
        x0 = (cell % 2) * half + rng.randint(0, slack)
        y0 = (cell // 2) * half + rng.randint(0, slack)
        objects.append(SceneObject(colour, shape, cell, x0 + size // 2, y0 + size // 2, size))
    return Scene(tuple(objects))


def render(scene: Scene, image_size: int) -> Image.Image:
    """RGB image of ``scene`` (``image_size`` x ``image_size``)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        r = o.size // 2
        x0, y0, x1, y1 = o.cx - r, o.cy - r, o.cx - r + o.size - 1, o.cy - r + o.size - 1
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign of two bars a third of the size wide
            w = max(o.size // 3, 2)
            draw.rectangle((o.cx - w // 2, y0, o.cx - w // 2 + w - 1, y1), fill=fill)
            draw.rectangle((x0, o.cy - w // 2, x1, o.cy - w // 2 + w - 1), fill=fill)
    return image
