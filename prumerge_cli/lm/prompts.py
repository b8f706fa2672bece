"""A question as the LM expects it: the model's own chat template where it has one (split at the image), the
plain template of the embedded model otherwise (`<s>`, the image, the question)."""

from __future__ import annotations

IMAGE = "<image>"


def prompt_ids(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """(tokens between `<s>` and the image, tokens after it) for `question`."""
    if not getattr(tokenizer, "chat_template", None):
        return [], tokenizer(question, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    before, found, after = text.partition(IMAGE)
    if not found:  # a template that places no image marker: the question follows the image
        before, after = "", text
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return encode(before), encode(after)
