"""Prompt formatting per model family: the checkpoint's chat template first, then the family's default.

    prompt(processor, "What colour is the circle?")   # one user turn: the image, then the question

A checkpoint that ships a chat template (``chat_template.jinja``, as llava-hf's and the micro-LLaVA's
do) is prompted with it. One without falls back on its family's documented format (by the processor's
class), written as a chat template so that several images and interleaved text work the same way:

* LLaVA-1.5 (``LlavaProcessor``): ``USER: <image>\\n{question} ASSISTANT:`` (the llava-hf model card);
* LLaVA-NeXT (``LlavaNextProcessor``): ``[INST] <image>\\n{question} [/INST]`` (llava-v1.6-mistral-7b-hf,
  transformers' documented example; a Vicuna-based LLaVA-NeXT ships its own template);
* Qwen2-VL (``Qwen2VLProcessor``): the ChatML turn of Qwen2-VL's HF template, with its default system
  message ``You are a helpful assistant.``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Each renders ``messages`` (a user turn whose content is ``{"type": "image"}`` / ``{"type": "text"}``
# parts in order, assistant turns with text parts) and, with ``add_generation_prompt``, the assistant's cue.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} [/INST]{% else %} {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
)
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FAMILY_TEMPLATES: dict[str, str] = {
    "LlavaProcessor": LLAVA_TEMPLATE,
    "LlavaNextProcessor": LLAVA_NEXT_TEMPLATE,
    "Qwen2VLProcessor": QWEN2_VL_TEMPLATE,
}
"""The default chat template of each supported family, by processor class name."""


def chat_template(processor: Any) -> str:
    """The template ``processor`` is prompted with: its own, else its family's default."""
    own = getattr(processor, "chat_template", None)
    if own:
        return own
    name = type(processor).__name__
    if name not in FAMILY_TEMPLATES:
        raise ValueError(f"{name} has no chat template and no family default; supported: {sorted(FAMILY_TEMPLATES)}")
    return FAMILY_TEMPLATES[name]


def render(processor: Any, content: Sequence[dict[str, str]]) -> str:
    """One user turn of ``content`` parts (images and text in order) with the assistant's cue."""
    template = chat_template(processor)
    messages = [{"role": "user", "content": list(content)}]
    return processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)


def prompt(processor: Any, question: str, n_images: int = 1) -> str:
    """The prompt for ``question`` about ``n_images`` images (the images first)."""
    return render(processor, [{"type": "image"}] * n_images + [{"type": "text", "text": question}])
