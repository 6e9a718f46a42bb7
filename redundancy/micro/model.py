"""The micro-LLaVA: the project's model organism, built from the real HF LLaVA classes.

    model, processor = build_micro(MicroConfig(), words=vocabulary())

A ``LlavaForConditionalGeneration`` with a small CLIP vision tower and a 32-layer
Llama text model (so layers 2/8/16/24 mean what they mean in the paper), a
word-level tokenizer over the benchmark's closed vocabulary, and a
``LlavaProcessor`` with the LLaVA-1.5 prompt template. Saved with
``save_pretrained`` it is an ordinary HF model directory (safetensors), loadable
offline with ``LlavaForConditionalGeneration.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` like a llava-hf checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from redundancy.models.factory import config_from_dims
from redundancy.presets import ModelDims
from redundancy.prompts import LLAVA_TEMPLATE

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PROMPT = "USER: <image>\n{question} ASSISTANT:"
# Training curriculum only (redundancy.micro.train, stages with prompt=bare): the question without
# "?" and the "ASSISTANT:" suffix, so the prompt ends on the word that names the object.
BARE_PROMPT = "USER: <image>\n{question}"
PROMPTS = ("llava", "bare")


def format_prompt(question: str, prompt: str = "llava") -> str:
    """The text prompt for ``question``: ``llava`` (LLaVA-1.5's template, what every
    evaluation uses) or ``bare`` (a training-curriculum template, see ``BARE_PROMPT``)."""
    if prompt == "llava":
        return PROMPT.format(question=question)
    if prompt == "bare":
        return BARE_PROMPT.format(question=question.rstrip().rstrip("?").rstrip())
    raise ValueError(f"prompt={prompt!r} is unknown; choose one of {PROMPTS}")


CHAT_TEMPLATE = LLAVA_TEMPLATE  # LLaVA-1.5's conversation format, shipped with the processor


@dataclass
class MicroConfig:
    """Shapes of the micro-LLaVA. ``(image_size / patch) ** 2`` image tokens per image."""

    layers: int = 32
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 4
    ffn: int = 344
    image_size: int = 96
    patch: int = 8
    vision_layers: int = 2
    vision_hidden: int = 96
    vision_heads: int = 4
    vision_ffn: int = 192

    @property
    def n_image(self) -> int:
        return (self.image_size // self.patch) ** 2

    def dims(self, vocab: int, n_text: int = 16) -> ModelDims:
        """The same shapes as :class:`~redundancy.presets.ModelDims` (FLOPs, model building)."""
        return ModelDims(
            name="micro-llava", num_layers=self.layers, hidden=self.hidden, ffn=self.ffn, heads=self.heads,
            kv_heads=self.kv_heads, vocab=vocab, n_image=self.n_image, n_text=n_text,
            vision_layers=self.vision_layers, vision_hidden=self.vision_hidden, vision_ffn=self.vision_ffn,
            vision_heads=self.vision_heads, vision_tokens=self.n_image + 1, vision_patch=self.patch,
            vision_crops=1, projector_in=self.vision_hidden, projector_hidden=self.hidden,
        )


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level, lowercasing tokenizer over ``words`` plus the prompt's own words and
    punctuation; ``<s>`` is prepended like LLaMA's tokenizer does."""
    base = {"user", "assistant", ":", "?", ",", ".", "'"}
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for word in sorted(base | {w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, cfg: MicroConfig) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: MicroConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """Random-initialised micro-LLaVA with zero-initialised residual outputs
    (attention ``o_proj`` and MLP ``down_proj``): every decoder layer starts as the
    identity, which keeps a deep stack trainable and lets a trained shallow model
    be grown into it without changing its function (:func:`grow`)."""
    config = config_from_dims(
        cfg.dims(vocab=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,  # two vision layers: use the last one
        vision_feature_select_strategy="default",
    )
    assert isinstance(config, LlavaConfig)  # family="llava" (the default)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    config.micro = asdict(cfg)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    for layer in model.model.language_model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def text_config(model: LlavaForConditionalGeneration) -> PreTrainedConfig:
    """The decoder's config. HF types ``LlavaConfig.text_config`` as dict, config or None; a built
    ``LlavaConfig`` always holds a config there (it turns a dict or None into one)."""
    text = model.config.text_config
    assert isinstance(text, PreTrainedConfig)
    return text


def build_micro(
    cfg: MicroConfig, words: Iterable[str], seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = build_tokenizer(words)
    return build_model(cfg, tokenizer, seed), build_processor(tokenizer, cfg)


GROWTH = ("identity", "split")


def grow_sources(shallow: int, deep: int) -> list[int]:
    """For ``split`` growth: the shallow layer each deep layer copies. Layer 0 stays alone (its
    update is many times its input, so copies of it would not add up to it); deep layer ``j >= 1``
    copies shallow layer ``max(1, j // step)``, so shallow layer 1 fills deep layers 1 to
    ``2 * step - 1`` and every later layer ``i`` its own span from ``i * step``."""
    step = deep // shallow
    if step * shallow != deep or shallow < 2:
        raise ValueError(f"{deep} deep layers are not a multiple of {shallow} shallow ones (at least 2)")
    return [0] + [max(1, j // step) for j in range(1, deep)]


def grow(
    model: LlavaForConditionalGeneration, deep: LlavaForConditionalGeneration, mode: str = "identity"
) -> LlavaForConditionalGeneration:
    """Copy a trained shallow model into ``deep`` (same shapes, more layers); every non-decoder
    weight is copied.

    ``identity``: shallow layer ``i`` goes to deep layer ``i * L_deep / L_shallow`` (evenly spread),
    the other deep layers keep their identity initialisation; the grown model computes the
    shallow model's function exactly, but the identity layers get no gradient through their
    zeroed outputs and stay inert (issue 26's measurement of the v22 pair).
    ``split``: every deep layer is a copy of a shallow layer (:func:`grow_sources`), each of the
    ``n`` copies of a layer with its residual outputs (``o_proj``, ``down_proj``) scaled by
    ``1/n``, so that the copies together make the layer's update to first order and every deep
    layer starts with a working attention and MLP."""
    if mode not in GROWTH:
        raise ValueError(f"growth {mode!r} is unknown; choose one of {GROWTH}")
    shallow_layers = model.model.language_model.layers
    deep_layers = deep.model.language_model.layers
    sources = grow_sources(len(shallow_layers), len(deep_layers))
    state = {k: v for k, v in model.state_dict().items() if ".language_model.layers." not in k}
    missing = deep.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    if mode == "identity":
        step = len(deep_layers) // len(shallow_layers)
        for i, layer in enumerate(shallow_layers):
            deep_layers[i * step].load_state_dict(layer.state_dict())
        return deep
    copies = [sources.count(i) for i in range(len(shallow_layers))]
    with torch.no_grad():
        for j, i in enumerate(sources):
            deep_layers[j].load_state_dict(shallow_layers[i].state_dict())
            deep_layers[j].self_attn.o_proj.weight.div_(copies[i])
            deep_layers[j].mlp.down_proj.weight.div_(copies[i])
    return deep


def shrink(model: LlavaForConditionalGeneration, keep: list[int]) -> LlavaForConditionalGeneration:
    """The model with only the decoder layers ``keep`` (in order): e.g. the trained layers of a
    model grown with ``identity`` growth, whose other layers stayed the identity."""
    layers = model.model.language_model.layers
    model.model.language_model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(model.model.language_model.layers):
        layer.self_attn.layer_idx = new
    text = text_config(model)
    text.num_hidden_layers = len(keep)
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in keep]
    model.config.micro = {**model.config.micro, "layers": len(keep)} if getattr(model.config, "micro", None) else None
    return model
