"""Prompts per model family (issue 31): the checkpoint's chat template first, then the family's default,
never the micro-LLaVA's format for another family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from redundancy.data import Sample
from redundancy.evaluate import prompts
from redundancy.micro.model import PROMPT, MicroConfig, build_micro
from redundancy.micro.train import vocabulary
from redundancy.prompts import FAMILY_TEMPLATES, prompt

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|image_pad|>", "what", "colour"]
QUESTION = "What colour is the circle?"


def tokenizer(image_token: str) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": image_token},
    )


def llava_next_processor() -> Any:
    """A tiny LLaVA-NeXT processor with no chat template (as a checkpoint without chat_template.jinja loads)."""
    return transformers.LlavaNextProcessor(image_processor=transformers.LlavaNextImageProcessorPil(),
                                           tokenizer=tokenizer("<image>"))


def qwen2_vl_processor() -> Any:
    """A tiny Qwen2-VL processor with no chat template. Its constructor insists on a video processor,
    which needs torchvision (absent on the CPU test machines); prompting touches neither, so the
    processor is assembled from its tokenizer and image processor."""
    processor = object.__new__(transformers.Qwen2VLProcessor)
    processor.tokenizer = tokenizer("<|image_pad|>")
    processor.image_processor = transformers.Qwen2VLImageProcessorPil()
    processor.chat_template = None
    return processor


def sample() -> Sample:
    return Sample(question_id="q", image_path=Path("x.png"), question=QUESTION, answers=("red",), family="color")


def test_llava_next_without_template_gets_its_family_default() -> None:
    processor = llava_next_processor()
    assert processor.chat_template is None
    assert prompts(processor, [sample()]) == [f"[INST] <image>\n{QUESTION} [/INST]"]


def test_qwen2_vl_without_template_gets_its_family_default() -> None:
    processor = qwen2_vl_processor()
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert prompts(processor, [sample()]) == [expected]
    # two images: one vision block each, before the text
    assert prompt(processor, QUESTION, n_images=2).count("<|vision_start|><|image_pad|><|vision_end|>") == 2


def test_llava_without_template_gets_llava_15_format_and_a_checkpoint_template_wins() -> None:
    cfg = MicroConfig(layers=2)
    _, processor = build_micro(cfg, vocabulary(cfg))
    assert prompts(processor, [sample()]) == [PROMPT.format(question=QUESTION)]  # the micro's own template
    processor.chat_template = None  # a LLaVA-1.5 checkpoint without one: the family's default, the same text
    assert prompt(processor, QUESTION) == f"USER: <image>\n{QUESTION} ASSISTANT:"
    processor.chat_template = "{{ messages[0]['content'][-1]['text'] }} =>"
    assert prompt(processor, QUESTION) == f"{QUESTION} =>"
    next_processor = llava_next_processor()
    next_processor.chat_template = processor.chat_template
    assert prompt(next_processor, QUESTION) == f"{QUESTION} =>"


def test_family_without_default_is_an_error() -> None:
    class OtherProcessor:
        chat_template = None

    assert "OtherProcessor" not in FAMILY_TEMPLATES
    with pytest.raises(ValueError, match="no chat template and no family default"):
        prompt(OtherProcessor(), QUESTION)
