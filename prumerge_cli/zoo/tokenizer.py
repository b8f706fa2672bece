"""The world's word-level tokenizer, as a standard `PreTrainedTokenizerFast`."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase, Replace, Sequence
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from .world import READ_AS, vocabulary

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"


def build_tokenizer(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Specials first (<pad>=0, <unk>=1, <s>=2, </s>=3, <image>=4), then the world's words, then `extra` words."""
    vocab = {word: i for i, word in enumerate((*SPECIALS, *vocabulary(), *extra))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    folds = [Replace(Regex(rf"\b{spelling}\b"), word) for spelling, word in READ_AS.items()]
    core.normalizer = Sequence([Lowercase(), *folds])  # "an orange cross" reads as the trained "a orange cross"
    core.pre_tokenizer = Whitespace()  # words and punctuation apart: "Describe the image." reads as the world's words
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
