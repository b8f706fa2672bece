"""The embedded LLaVA's processor, saved beside its weights so that `AutoProcessor.from_pretrained` works on it as
on a hub LLaVA-1.5: CLIP's image processor, the world's tokenizer, the expansion of `<image>` into the tower's
patches, and a chat template that writes the prompt the model was trained on (`<s>`, the image, the question)."""

from __future__ import annotations

from pathlib import Path

from transformers import LlavaProcessor, PreTrainedTokenizerFast

from .clip_training import image_processor

PATCH_SIZE = 14
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
"""One user turn: `<s><image>question` (the world's questions: lower case, no question mark); an assistant turn
ends with `</s>`. Generation needs no prompt after the question."""


def llava_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The processor of the embedded LLaVA: one `<image>` becomes the 256 patch tokens of the 224-pixel tower plus
    the class token the 'default' strategy drops."""
    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)  # fmt: skip


def save_processor(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Write the processor's files (image processor, tokenizer, processor config, chat template) into `target`."""
    llava_processor(tokenizer).save_pretrained(str(target))
