"""POVID's teacher-forced hallucinated answer as one more rejected slot of an offline preference batch.

Amirloo et al. 2024 (arXiv 2407.02477) train several rejected answers per chosen answer with the weighted
mean of the pairwise losses (Eq. 5), e.g. POVID-style + BDHS. Here the POVID-style answer is made inside the
trainer (``mmalign.sampling.povid``): each record's images are noised (Eq. 8/9, ``noise_steps``), the argmax
answer under the noised image is teacher-forced on the chosen answer and scored under the clean image, for
the policy (with gradient) and for the reference (no gradient). The noise is seeded by (run seed, record id,
image index), so every step, process count and resumed run sees the same noised image for a record. Each
model takes its own argmax (POVID's code); the slot's reference log-probs are therefore always computed live,
also when the trainer caches the others (``ref_cache_dir``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from mmalign.data.collate import collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import PreferenceForward
from mmalign.sampling.povid import NUM_DIFFUSION_STEPS, noise_seed, noised_image


@dataclass
class PovidConfig:
    """The POVID slot: off by default; ``weight`` is its weight in the Eq. 5 mean beside ``loss.rejected_weights``;
    ``noise_clip``: clip noised pixels before the 8-bit cast (default off: they wrap, as in POVID's code)."""

    enabled: bool = False  # add POVID's answer under a noised image as one more rejected slot
    noise_steps: int = 500  # diffusion noise steps of 1000 applied to the image (POVID Eq. 8/9)
    weight: float = 1.0  # weight of the POVID slot in the Eq. 5 mean
    noise_clip: bool = False  # clip noised pixels to [0, 1] (false: they wrap in the 8-bit cast, as POVID's code)

    def __post_init__(self) -> None:
        if not 1 <= self.noise_steps < NUM_DIFFUSION_STEPS:
            raise ValueError(f"povid.noise_steps must be in 1..{NUM_DIFFUSION_STEPS - 1}, got {self.noise_steps}")
        if not 0 < self.weight < math.inf:
            raise ValueError(f"povid.weight must be a finite number > 0, got {self.weight}")


def povid_batches(processor: Any, records: Sequence[PreferenceRecord], images: Sequence[Sequence[Image.Image]],
                  n_steps: int, seed: int, max_length: int | None, *, clip: bool = False
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clean, noisy) ``collate_sft`` batches of the R records' prompt + chosen answer; only the images differ."""
    noisy = [[noised_image(image, n_steps, noise_seed(seed, r.id, i), clip=clip) for i, image in enumerate(imgs)]
             for r, imgs in zip(records, images)]
    return (collate_sft(processor, records, images, max_length), collate_sft(processor, records, noisy, max_length))


def with_extra_rejected(out: PreferenceForward, extra_logps: torch.Tensor) -> PreferenceForward:
    """``out`` with one more rejected slot (column K) holding ``extra_logps`` float[R] for every record.

    The extra answer is teacher-forced on the chosen answer, so its length is the chosen answer's.
    """
    ones = torch.ones_like(out.rejected_mask[:, :1])
    return out._replace(
        rejected_logps=torch.cat([out.rejected_logps, extra_logps.to(out.rejected_logps.dtype)[:, None]], dim=1),
        rejected_mask=torch.cat([out.rejected_mask, ones], dim=1),
        rejected_lengths=torch.cat([out.rejected_lengths, out.chosen_lengths[:, None]], dim=1),
    )
