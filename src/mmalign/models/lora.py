"""The trained policy and its reference: what trains (LoRA through peft, or full fine-tuning), and the model
the reference log-probs come from.

Every preference recipe (offline, online, mixed) loads its policy through ``prepare_policy``. Under LoRA the
reference is the policy itself with its adapter disabled (no second copy; the projector is trained through
PEFT ``modules_to_save``, whose original stays in place for the reference); under full fine-tuning it is a
frozen copy. ``reference_model`` hides that difference from the callers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from mmalign.config import ConfigError
from mmalign.models.loading import PROJECTOR_MODULES, freeze_vision_tower, load_vlm, projector_param_names

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    """The policy: a local ``save_pretrained`` directory. The vision tower is frozen by default."""

    SHORTHAND: ClassVar[str] = "path"  # model=DIR sets model.path

    path: str = ""  # local model folder (save_pretrained layout: config.json, weights, processor files)
    dtype: str | None = None  # weights dtype: float32 / bfloat16 / float16 / auto (the checkpoint's); None: float32
    trust_remote_code: bool = False  # allow model code shipped inside the folder
    freeze_vision: bool = True  # keep the vision tower frozen (required under LoRA)
    train_projector: bool = True  # train the vision-language projector (under LoRA as a saved full module)


@dataclass
class LoraConfig:
    """LoRA on the language model's linear layers named in ``target_modules`` (Apple used rank 128, alpha 256).

    ``enabled: false`` is full fine-tuning. Dropout is off everywhere so policy and reference agree at step 0.
    """

    enabled: bool = True  # LoRA adapters on the language model; false: full fine-tuning
    rank: int = 128  # LoRA rank r
    alpha: int = 256  # LoRA alpha (scale alpha / r)
    # names of the linear layers that get adapters
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not self.target_modules:
            raise ValueError("lora needs rank >= 1, alpha > 0 and at least one target module")


class PolicyConfig(Protocol):
    """Any recipe config with ``model`` and ``lora`` sections."""

    model: ModelConfig
    lora: LoraConfig


def _projector_modules(names: list[str]) -> tuple[list[str], list[str]]:
    """Projector parameter names -> (module names for PEFT ``modules_to_save``, bare parameters)."""
    modules, bare = set(), []
    for name in names:
        parts = name.split(".")
        cut = next(i for i, part in enumerate(parts) if part in PROJECTOR_MODULES)
        (bare.append(name) if cut == len(parts) - 1 else modules.add(".".join(parts[: cut + 1])))
    return sorted(modules), bare


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout probability 0 everywhere (TRL's ``disable_dropout``): policy and reference agree at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prepare_policy(cfg: PolicyConfig, with_reference: bool = True) -> tuple[Any, Any, Any, list[str]]:
    """Load the policy and set what trains; returns (policy, processor, frozen reference or None, projector names).

    Under LoRA the reference is the policy with its adapter disabled (None is returned); a bare projector
    parameter (LLaVA-NeXT ``image_newline``) cannot be a PEFT module and stays frozen there. A recipe without a
    reference (reward models) passes ``with_reference=False``: no frozen copy is made under full fine-tuning.
    """
    model, processor = load_vlm(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    disable_dropout(model)
    if cfg.model.freeze_vision:
        freeze_vision_tower(model)
    projector = projector_param_names(model)
    if not cfg.lora.enabled:
        for name, param in model.named_parameters():
            if name in projector and not cfg.model.train_projector:
                param.requires_grad_(False)
        reference = copy.deepcopy(model).requires_grad_(False).eval() if with_reference else None
        return model.train(), processor, reference, projector
    model, projector = add_lora(model, cfg.lora, projector if cfg.model.train_projector else [])
    return model.train(), processor, None, projector


def add_lora(model: Any, lora: LoraConfig, projector: list[str]) -> tuple[Any, list[str]]:
    """Wrap ``model`` in a PEFT LoRA model; returns it and the names of its trainable projector copies."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    decoder = {id(m) for m in model.get_decoder().modules()}
    targets = [name for name, m in model.named_modules() if id(m) in decoder and isinstance(m, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in lora.target_modules]
    if not targets:
        raise ConfigError(f"lora.target_modules {lora.target_modules} match no linear layer of the language model")
    to_save, bare = _projector_modules(projector)
    if bare:
        logger.warning("projector parameters %s are not modules; they stay frozen under LoRA", bare)
    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                 target_modules=targets, modules_to_save=to_save or None)
    model = get_peft_model(model, peft_config)
    projector = [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA on %d layers (+%d projector tensors): %d trainable parameters", len(targets),
                len(projector), trainable)
    return model, projector


@contextlib.contextmanager
def reference_model(policy: Any, frozen: Any | None) -> Iterator[Any]:
    """The reference model, without gradients: the frozen copy, or the (PEFT) policy with its adapter disabled.

    ``policy`` is the unwrapped policy (not a DDP / DeepSpeed wrapper), as ``prepare_policy`` returned it.
    """
    adapter_off = policy.disable_adapter() if frozen is None else contextlib.nullcontext()
    with torch.no_grad(), adapter_off:
        yield policy if frozen is None else frozen
