"""A word-level tokenizer for the toy CLIP's text tower.

Texts are lower-cased and split into runs of letters ("star-shaped" -> "star", "shaped";
punctuation and digits are dropped). Ids: 0 pads, 1 is ``<unk>`` (any word not in the
vocabulary), 2 starts a text, then the words in sorted order, and the end-of-text token is
the highest id, so open_clip's default ``argmax`` text pooling reads the end-of-text position.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from .generator import CAPTION_TEMPLATES, FACTORS, SCENE_WORDS

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
_WORD = re.compile(r"[a-z]+")
_PLACEHOLDER = re.compile(r"\{\w*\}")
# the word captions use for each pattern (as ``generator.caption`` writes them)
PATTERN_WORDS = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}


def words_of(text: str) -> list[str]:
    """The words the tokenizer sees: lower-case runs of letters."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word-level tokenizer: ``vocabulary(texts) -> ids [T, context_length]`` (int64).

    words:          the known words (ids 3 .. 2 + len(words), in this order)
    context_length: tokens per text including start and end; longer texts are cut, keeping the end token
    """

    def __init__(self, words: Sequence[str], context_length: int):
        if len(set(words)) != len(words) or any(w in (PAD, UNK, START, END) for w in words):
            raise ValueError("vocabulary words must be unique and must not be a special token")
        if context_length < 3:
            raise ValueError(f"context_length {context_length} leaves no room for a word between start and end")
        self.words, self.context_length = tuple(words), context_length
        self.tokens = (PAD, UNK, START, *self.words, END)
        self.ids = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def end_id(self) -> int:
        return len(self.tokens) - 1

    def encode(self, text: str) -> list[int]:
        """Ids of one text: start, words (unknown ones as ``<unk>``), end; not padded."""
        body = [self.ids.get(word, self.ids[UNK]) for word in words_of(text)][:self.context_length - 2]
        return [self.ids[START], *body, self.end_id]

    def __call__(self, texts: str | Iterable[str]) -> torch.Tensor:
        """Ids [T, context_length] (int64), zero-padded: open_clip's tokenizer interface."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, :len(encoded)] = torch.tensor(encoded)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The words of one row of ids (special tokens other than ``<unk>`` dropped)."""
        skip = {self.ids[PAD], self.ids[START], self.end_id}
        return " ".join(self.tokens[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids) if i not in skip)


def toy_words() -> list[str]:
    """Sorted words of the toy captions, factor values, CLIP's prompt templates and the shipped
    property descriptions: everything the toy CLIP may be asked to read."""
    from align.properties import shipped_properties
    from align.text_bank import imagenet_templates

    templates = [_PLACEHOLDER.sub(" ", template) for template in (*CAPTION_TEMPLATES, *imagenet_templates())]
    factor_words = [*(v for values in FACTORS.values() for v in values), *SCENE_WORDS.values(), *PATTERN_WORDS.values()]
    descriptions = [d for property_texts in shipped_properties().values() for d in property_texts]
    return sorted({word for text in (*templates, *factor_words, *descriptions) for word in words_of(text)})
