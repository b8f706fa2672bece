"""lmms-eval hooks of the prumerge_world tasks: the image, the question, and the project's scoring rule (a reply
is right when it ends with the answer, word for word, as the embedded model's word-level tokenizer reads it)."""

import re

WORDS = re.compile(r"\w+|[^\w\s]+")


def doc_to_visual(doc):
    """The question's image."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question as the world asks it."""
    return doc["question"]


def ends_with_answer(reply, answer):
    """Whether the reply's last words are the answer's words (lower case, punctuation apart)."""
    said, wanted = WORDS.findall(reply.lower()), WORDS.findall(answer.lower())
    return len(said) >= len(wanted) and said[len(said) - len(wanted) :] == wanted


def process_results(doc, results):
    """Accuracy of one reply."""
    return {"accuracy": float(ends_with_answer(results[0], doc["answer"]))}
