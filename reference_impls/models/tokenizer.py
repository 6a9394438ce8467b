"""A word-level tokenizer built in code: no hub, no downloads, no silent degradation offline.

ShapeWorld prompts come from a small grammar, so a closed word vocabulary is exact. Unknown words map
to ``<unk>`` (the CLI rejects prompts outside the grammar before they reach the model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class WordTokenizer:
    """Maps lower-cased words to ids, with BOS/EOS and right padding to ``model_max_length``."""

    words: list[str]
    """The vocabulary after the special tokens, in id order."""
    model_max_length: int = 16
    """Sequences are padded or truncated to this many tokens (BOS and EOS included)."""
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {token: i for i, token in enumerate(self.vocabulary)}

    @property
    def vocabulary(self) -> list[str]:
        return [*SPECIAL_TOKENS, *self.words]

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def pad_token_id(self) -> int:
        return self._index["<pad>"]

    @property
    def bos_token_id(self) -> int:
        return self._index["<bos>"]

    @property
    def eos_token_id(self) -> int:
        return self._index["<eos>"]

    def id_of(self, token: str) -> int | None:
        """The id of a word or special token, None if it is not in the vocabulary."""
        return self._index.get(token)

    def split(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        unk = self._index["<unk>"]
        ids = [self._index.get(word, unk) for word in self.split(text)]
        ids = [self.bos_token_id, *ids[: self.model_max_length - 2], self.eos_token_id]
        return ids + [self.pad_token_id] * (self.model_max_length - len(ids))

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.encode(t) for t in texts], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"words": self.words, "model_max_length": self.model_max_length}
        (directory / "vocab.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> WordTokenizer:
        payload = json.loads((Path(directory) / "vocab.json").read_text(encoding="utf-8"))
        return cls(words=list(payload["words"]), model_max_length=int(payload["model_max_length"]))
