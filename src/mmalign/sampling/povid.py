"""POVID-style image distortion: diffusion noise (Eq. 8/9) and the teacher-forced rejected answer.

Follows the POVID public code (YiyangZhou/POVID @ 92c7c67, ``add_diffusion_noise`` and
``_get_noisy_batch_logps``) as summarised in Amirloo et al. 2024 (arXiv 2407.02477), App. E.1 and Eq. 5:

- noise: 1000-step sigmoid beta schedule, beta_k = sigmoid(linspace(-6, 6, 1000))_k * (0.5e-2 - 1e-5) + 1e-5,
  alpha_bar = cumprod(1 - beta), x_N = sqrt(alpha_bar[N]) x_0 + sqrt(1 - alpha_bar[N]) eps on [0, 1] pixels
  before the processor (index N 0-based as in the code; N = 500 by default);
- rejected answer: at every position of the chosen answer take the argmax token under the *noised* image
  (teacher forcing on the chosen prefix), and score it under the *clean* image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmalign.data.collate import IGNORE_INDEX, collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import model_inputs

NUM_DIFFUSION_STEPS = 1000


def povid_alpha_bar() -> Tensor:
    """float64[1000] cumulative products alpha_bar_k = prod_{j<=k} (1 - beta_j) of the POVID schedule (Eq. 9)."""
    betas = torch.sigmoid(torch.linspace(-6.0, 6.0, NUM_DIFFUSION_STEPS, dtype=torch.float64))
    betas = betas * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def add_diffusion_noise(pixels: Tensor, n_steps: int, generator: torch.Generator) -> Tensor:
    """Eq. 9: sqrt(alpha_bar[n]) * pixels + sqrt(1 - alpha_bar[n]) * eps, eps ~ N(0, I) from ``generator``.

    ``pixels``: float[..., H, W] in [0, 1] (any leading dims); returns the same shape and dtype, unclipped.
    ``n_steps`` in 1..999 indexes the schedule as POVID's code does (0-based).
    """
    if not 1 <= n_steps < NUM_DIFFUSION_STEPS:
        raise ValueError(f"n_steps must be in 1..{NUM_DIFFUSION_STEPS - 1}, got {n_steps}")
    alpha_bar = float(povid_alpha_bar()[n_steps])
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device, pixels.dtype)
    return alpha_bar**0.5 * pixels + (1.0 - alpha_bar) ** 0.5 * eps


def noised_image(image: Image.Image, n_steps: int, seed: int, *, clip: bool = False) -> Image.Image:
    """A noised RGB copy of ``image``: Eq. 9 on [0, 1] pixels, then back to 8 bits.

    By default as POVID's code does it: ``ToPILImage`` computes ``(x * 255).byte()``, which truncates towards
    zero and wraps out-of-range values modulo 256 (a pixel pushed to -0.01 becomes 255), written out here as
    ``trunc(255 x) mod 256`` so it does not depend on the platform's float-to-uint8 cast. At N = 500 about a
    third of the pixels of a typical image leave [0, 1] and wrap. ``clip=True`` clips to [0, 1] and rounds
    instead (the noise then only blurs, never inverts, a pixel).
    """
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # [H, W, 3]
    generator = torch.Generator().manual_seed(seed)
    noisy = add_diffusion_noise(pixels.permute(2, 0, 1), n_steps, generator).permute(1, 2, 0)
    if clip:
        values = (noisy.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    else:
        values = torch.remainder(torch.trunc(noisy * 255.0).to(torch.int64), 256).to(torch.uint8)
    return Image.fromarray(values.numpy(), mode="RGB")


def noise_seed(seed: int, record_id: str, image_index: int) -> int:
    """A 63-bit seed for one image's diffusion noise, a pure function of (run seed, record id, image index)."""
    digest = hashlib.sha256(f"{seed}\0{record_id}\0{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _predicting_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """bool[N, T] positions t - 1 that predict an answer token t, and the answer mask itself."""
    answer_mask = labels != IGNORE_INDEX
    if bool(answer_mask[:, 0].any()):
        raise ValueError("an answer token at position 0 has no preceding context to predict it from")
    predicts = torch.zeros_like(answer_mask)
    predicts[:, :-1] = answer_mask[:, 1:]
    return predicts, answer_mask


def povid_rejected_answers(model: Any, processor: Any, records: Sequence[PreferenceRecord],
                           images: Sequence[Sequence[Image.Image]], n_steps: int, seed: int) -> list[str]:
    """POVID's teacher-forced hallucinated answers as text (the rejected answers ``povid_rejected_logps`` scores).

    Each record's images are noised (Eq. 9, ``n_steps``; noise seeded by (seed, record id, image index)); at every
    position of the chosen answer the argmax token under the noised image is taken, teacher-forced on the chosen
    prefix, and the argmax tokens are decoded (special tokens dropped). Without gradients.
    """
    noisy = [[noised_image(image, n_steps, noise_seed(seed, r.id, i)) for i, image in enumerate(imgs)]
             for r, imgs in zip(records, images)]
    batch = collate_sft(processor, records, noisy)
    predicts, answer_mask = _predicting_positions(batch["labels"])
    device = next(model.parameters()).device
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        tokens = model(**inputs, logits_to_keep=predicts.to(device), use_cache=False).logits.argmax(dim=-1).cpu()
    per_row = answer_mask.sum(dim=1).tolist()
    rows = tokens.split(per_row)
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def povid_rejected_logps(model: Any, clean_batch: Mapping[str, Any], noisy_batch: Mapping[str, Any]) -> Tensor:
    """Summed log-probs float[N] of POVID's teacher-forced hallucinated answer (POVID code, Eq. 5 term).

    ``clean_batch`` / ``noisy_batch``: ``mmalign.data.collate.collate_sft`` batches of the same records and
    chosen answers (identical ``input_ids`` [N, T] and ``labels`` [N, T]), the second built from noised images
    (``noised_image``; draw the noise once per example so policy and reference see the same image).
    For every answer position t: y_hat_t = argmax_v p(v | y+_{<t}, noisy image) (no gradient), then
    log pi(y~-) = sum_t log p(y_hat_t | y+_{<t}, clean image), with gradient through the clean forward.
    Call it under ``torch.no_grad()`` for the reference model.
    """
    if not torch.equal(clean_batch["input_ids"], noisy_batch["input_ids"]) or not torch.equal(
        clean_batch["labels"], noisy_batch["labels"]
    ):
        raise ValueError("clean and noisy batches must hold the same tokens and labels (only images differ)")
    predicts, answer_mask = _predicting_positions(clean_batch["labels"])
    with torch.no_grad():
        noisy_logits = model(**model_inputs(noisy_batch), logits_to_keep=predicts, use_cache=False).logits
    hallucinated = noisy_logits.argmax(dim=-1)  # [N_a], row-major over the predicting positions
    clean_logits = model(**model_inputs(clean_batch), logits_to_keep=predicts, use_cache=False).logits.float()
    picked = clean_logits.gather(-1, hallucinated.unsqueeze(-1)).squeeze(-1) - clean_logits.logsumexp(dim=-1)
    token_logps = torch.zeros(answer_mask.shape, dtype=picked.dtype, device=picked.device)
    token_logps = token_logps.masked_scatter(answer_mask, picked)
    return token_logps.sum(dim=-1)
