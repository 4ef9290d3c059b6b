"""Tiny, randomly initialised vision-language models of real architectures, built fully offline.

``build_tiny_vlm(family, seed)`` returns a ``(model, processor)`` pair whose classes are the real
transformers classes of that family (LLaVA-1.5, LLaVA-NeXT AnyRes, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM,
Gemma3), shrunk to a hidden size of 64, a one- or two-layer vision tower and 32x32 image tiles, so tests and
the ShapesWorld lab can run every code path on CPU in seconds. Each tokenizer is a byte-level BPE trained
locally with ``tokenizers`` (exact decode round-trips) carrying the family's special tokens, and each
processor carries a chat template in the family's own turn format, so ``render_prompt`` exercises the same
structure the full-size checkpoints use.

In transformers 5 the Qwen-VL processors cannot be built without torchvision (their video processor needs it);
``build_tiny_model`` and ``qwen_image_processor`` give the model, tokenizer and image processor alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.models.gemma3 import Gemma3Config
from transformers.models.idefics3 import Idefics3Config
from transformers.models.llava import LlavaConfig
from transformers.models.llava_next import LlavaNextConfig
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_vl import Qwen2VLConfig

from mmalign.models.families import TINY_FAMILIES

FAMILIES = TINY_FAMILIES

# Image side of one vision-tower tile and the ViT patch; 32 / 8 -> a 4x4 patch grid per tile.
TILE = 32
PATCH = 8
# Text model: hidden 64 with 4 heads of 16 dims, 2 layers (enough for attention patterns to matter).
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=TILE, patch_size=PATCH, projection_dim=32)
SIGLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     image_size=TILE, patch_size=PATCH)

# Text the BPE merges are learnt from: the ShapesWorld lab's language plus generic VLM prompts.
_COLOURS = "red green blue yellow purple orange black white gray pink brown cyan"
_SHAPES = "circle square triangle star hexagon diamond cross heart pentagon ellipse"
_CORPUS = [
    f"There is a {c} {s} and a {c2} {s2}." for c in _COLOURS.split() for s in _SHAPES.split()
    for c2, s2 in [("blue", "square"), ("red", "circle")]
] + [f"Is there a {c} {s} in the image? Yes. No." for c in _COLOURS.split() for s in _SHAPES.split()] + [
    f"There are two {c} {s}s, three {s}s, some {s}es." for c in _COLOURS.split() for s in _SHAPES.split()
] + [
    "Describe the image. Describe the image in detail. What is shown in the picture?",
    "The image shows a small object on the left, the right, the top and the bottom.",
    "USER: ASSISTANT: User: Assistant: [INST] [/INST] system user assistant model You are a helpful assistant.",
    "How many objects are there? What color is it? Answer the question with a single word.",
] * 20  # repeated so prompt words become whole tokens, not letter runs


@dataclass(frozen=True)
class _Family:
    """Tokens and turn format of one family (what its real tokenizer and chat template use)."""

    specials: list[str]
    bos: str
    eos: str
    pad: str
    named: dict[str, str]   # tokenizer attributes such as image_token, boi_token
    image_slot: str         # text a {"type": "image"} content entry renders to
    turn_open: dict[str, str]
    turn_close: dict[str, str]
    prefix: str = ""        # text before the first turn (e.g. BOS when the template, not the tokenizer, adds it)
    extra: list[str] = field(default_factory=list)


_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_QWEN = _Family(
    specials=_QWEN_SPECIALS, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>",
    named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
           "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    image_slot="<|vision_start|><|image_pad|><|vision_end|>",
    turn_open={"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
               "assistant": "<|im_start|>assistant\n"},
    turn_close={"system": "<|im_end|>\n", "user": "<|im_end|>\n", "assistant": "<|im_end|>\n"},
)
_SPECS: dict[str, _Family] = {
    # LLaVA-1.5 (Vicuna): "USER: <image>\n... ASSISTANT: answer</s>"
    "llava": _Family(
        specials=_LLAMA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", named={"image_token": "<image>"},
        image_slot="<image>\n", prefix="<s>",
        turn_open={"system": "", "user": "USER: ", "assistant": "ASSISTANT:"},
        turn_close={"system": " ", "user": " ", "assistant": "</s>"},
    ),
    # LLaVA-NeXT (Mistral): "[INST] <image>\n... [/INST]answer</s>"
    "llava_next": _Family(
        specials=_LLAMA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>", named={"image_token": "<image>"},
        image_slot="<image>\n", prefix="<s>",
        turn_open={"system": "", "user": "[INST] ", "assistant": ""},
        turn_close={"system": "\n", "user": " [/INST]", "assistant": "</s>"},
    ),
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    # SmolVLM / Idefics3: "<|im_start|>User:<image>...<end_of_utterance>\nAssistant:"
    "idefics3": _Family(
        specials=["<unk>", "<|im_start|>", "<end_of_utterance>", "<pad>", "<image>",
                  "<fake_token_around_image>", "<global-img>"],
        extra=[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<pad>", named={"image_token": "<image>"},
        image_slot="<image>", prefix="<|im_start|>",
        turn_open={"system": "System:", "user": "User:", "assistant": "Assistant:"},
        turn_close={"system": "<end_of_utterance>\n", "user": "<end_of_utterance>\n",
                    "assistant": "<end_of_utterance>\n"},
    ),
    # Gemma3: "<bos><start_of_turn>user\n<start_of_image>...<end_of_turn>\n<start_of_turn>model\n"
    "gemma3": _Family(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"],
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", prefix="<bos>",
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
               "eoi_token": "<end_of_image>"},
        image_slot="<start_of_image>",
        turn_open={"system": "<start_of_turn>user\n", "user": "<start_of_turn>user\n",
                   "assistant": "<start_of_turn>model\n"},
        turn_close={"system": "\n", "user": "<end_of_turn>\n", "assistant": "<end_of_turn>\n"},
    ),
}


def _chat_template(spec: _Family) -> str:
    """Jinja chat template: string or content-list messages, images rendered as the family's slot text."""
    def by_role(table: dict[str, str]) -> str:
        return "".join(
            f"{'{% if' if i == 0 else '{% elif'} m['role'] == '{role}' %}}{text}" for i, (role, text) in
            enumerate(table.items())
        ) + "{% endif %}"

    content = (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        f"{{% if c['type'] == 'image' %}}{spec.image_slot}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    return (
        f"{spec.prefix}{{% for m in messages %}}{by_role(spec.turn_open)}{content}{by_role(spec.turn_close)}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{spec.turn_open['assistant']}{{% endif %}}"
    )


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (at most 600 entries; every byte is a token, so no unknown token is needed) trained on the
    built-in corpus, with the family's special tokens, left padding and the family-style chat template."""
    spec = _SPECS[family]
    specials = spec.specials + spec.extra
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        extra_special_tokens=spec.named, additional_special_tokens=spec.extra or None,
        padding_side="left", chat_template=_chat_template(spec),
    )


def _ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llava(tok: PreTrainedTokenizerFast) -> tuple[Any, Callable[[], Any]]:
    """LLaVA-1.5: CLIP tower, CLS dropped ("default" strategy) -> 16 image tokens per 32x32 image."""
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **CLIP_VISION),
        text_config=dict(model_type="llama", **TEXT, **_ids(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(TILE // PATCH) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config), lambda: LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )


def _llava_next(tok: PreTrainedTokenizerFast) -> tuple[Any, Callable[[], Any]]:
    """LLaVA-NeXT AnyRes: a non-square image picks a 1x2 or 2x1 tile grid + base tile + row newlines."""
    pinpoints = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **CLIP_VISION),
        text_config=dict(model_type="mistral", **TEXT, **_ids(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        image_seq_length=(TILE // PATCH) ** 2, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return LlavaNextForConditionalGeneration(config), lambda: LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )


def _qwen_text(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    # mRoPE splits head_dim/2 = 8 rotary frequencies into (temporal, height, width) sections.
    return dict(**TEXT, **_ids(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 3, 3]})


def qwen_image_processor() -> Qwen2VLImageProcessorPil:
    """Image processor of the tiny Qwen families: pixels bounded to 1-4 tiles, 8-pixel patches merged 2x2, so a
    64x64 image gives an 8x8 patch grid and 16 image tokens. Usable alone where the full processor is not."""
    return Qwen2VLImageProcessorPil(
        min_pixels=TILE * TILE, max_pixels=4 * TILE * TILE, patch_size=PATCH, merge_size=2, temporal_patch_size=2,
    )


class _SavedAsFullProcessor:
    """Saves a tiny Qwen processor as the full Qwen-VL one, so ``AutoProcessor`` reloads it where torchvision is
    importable: under its transformers parent's name (this module's class cannot be resolved there, and a bare
    tokenizer would come back) and with a video processor config of the image processor's geometry."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "processor_class": type(self).__bases__[-1].__name__}

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        image = self.image_processor
        video = {"video_processor_type": "Qwen2VLVideoProcessor", "size": dict(image.size),
                 "patch_size": image.patch_size, "temporal_patch_size": image.temporal_patch_size,
                 "merge_size": image.merge_size}
        (Path(save_directory) / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
        return saved


class _ImageOnlyQwen2VLProcessor(_SavedAsFullProcessor, Qwen2VLProcessor):
    """Qwen2-VL processor without its video processor (torchvision-backed in transformers 5).

    Tiny models exist for image preference data only; dropping the video half keeps the real image path
    (placeholder expansion, ``image_grid_thw``, ``mm_token_type_ids``) on machines without torchvision.
    Reloading a saved tiny Qwen model through ``AutoProcessor`` still needs the full processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class _ImageOnlyQwen2_5_VLProcessor(_SavedAsFullProcessor, Qwen2_5_VLProcessor):
    """Qwen2.5-VL counterpart of ``_ImageOnlyQwen2VLProcessor``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def _qwen_processor(cls: type, tok: PreTrainedTokenizerFast) -> Any:
    return cls(image_processor=qwen_image_processor(), tokenizer=tok, chat_template=tok.chat_template)


def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))


def _qwen2_vl(tok: PreTrainedTokenizerFast) -> tuple[Any, Callable[[], Any]]:
    config = Qwen2VLConfig(
        text_config=_qwen_text(tok), **_qwen_ids(tok),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2,
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2),
    )
    return Qwen2VLForConditionalGeneration(config), lambda: _qwen_processor(_ImageOnlyQwen2VLProcessor, tok)


def _qwen2_5_vl(tok: PreTrainedTokenizerFast) -> tuple[Any, Callable[[], Any]]:
    """Two vision blocks: block 0 uses windowed attention (32-pixel windows), block 1 full attention."""
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok), **_qwen_ids(tok),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=TEXT["hidden_size"], patch_size=PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=TILE, fullatt_block_indexes=[1]),
    )
    return Qwen2_5_VLForConditionalGeneration(config), lambda: _qwen_processor(_ImageOnlyQwen2_5_VLProcessor, tok)


def _idefics3(tok: PreTrainedTokenizerFast) -> tuple[Any, Callable[[], Any]]:
    """SmolVLM layout: images up to 64 px split into 32 px tiles + a global tile; pixel shuffle x2 -> 4 tokens each."""
    config = Idefics3Config(
        vision_config=dict(**SIGLIP_VISION), text_config=dict(model_type="llama", **TEXT, **_ids(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(config), lambda: Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            do_image_splitting=True, size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE},
        ),
        tokenizer=tok, image_seq_len=(TILE // PATCH) ** 2 // 4, chat_template=tok.chat_template,
    )


def _gemma3(tok: PreTrainedTokenizerFast) -> tuple[Any, Callable[[], Any]]:
    """Gemma3: SigLIP tower, 4x4 patches average-pooled to 2x2 = 4 soft tokens between BOI/EOI."""
    config = Gemma3Config(
        text_config=dict(**TEXT, **_ids(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
        vision_config=dict(model_type="siglip_vision_model", **SIGLIP_VISION), mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers zero-initialises this projection (fine under pretrained weights); at random init it would
    # erase the image, so draw it like every other weight.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    return model, lambda: Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": TILE, "width": TILE}, do_pan_and_scan=False),
        tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template,
    )


_BUILDERS: dict[str, Callable[[PreTrainedTokenizerFast], tuple[Any, Callable[[], Any]]]] = {
    "llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3, "gemma3": _gemma3,
}


def build_tiny_model(family: str, seed: int = 0) -> tuple[Any, PreTrainedTokenizerFast]:
    """The tiny model of ``family`` with its tokenizer only (no processor; needs no optional dependency).

    The model is in eval mode with ``generation_config`` pad/bos/eos set from the tokenizer; weights depend
    only on ``seed`` (the caller's global RNG state is left untouched).
    """
    model, _ = _build(family, seed)
    return model, build_tokenizer(family)


def build_tiny_vlm(family: str, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised tiny VLM of ``family`` and its processor (left padding, chat template set)."""
    model, make_processor = _build(family, seed)
    return model, make_processor()


def _build(family: str, seed: int) -> tuple[Any, Callable[[], Any]]:
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {', '.join(FAMILIES)}")
    tok = build_tokenizer(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, make_processor = _BUILDERS[family](tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), make_processor
