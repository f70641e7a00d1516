"""The model folder's tokenizer, when it has one: text prompts, chat templates, output text.

Without one the server takes token-id prompts only and streams empty text with the token ids
(as vLLM does with `skip_tokenizer_init`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
CONTEXT_TOKENS = 5  # tokens decoded before a new one, so merges and leading spaces come out right


def load_tokenizer(model_path: str | Path | None) -> Any | None:
    if model_path is None:
        return None
    path = Path(model_path)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    # transformers takes seconds to import: only a text prompt needs it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def has_chat_template(tokenizer: Any | None) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Detokenizer:
    """Text of each new token, decoded with a few tokens of context before it; text that
    ends mid-character (a multi-byte symbol split across tokens) waits for the next token."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.done = 0  # tokens whose text has been returned

    def add(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(token_ids)
        start = max(0, self.done - CONTEXT_TOKENS)
        before = self._decode(self.ids[start:self.done])
        text = self._decode(self.ids[start:])
        if text.endswith("\ufffd"):
            return ""
        self.done = len(self.ids)
        return text[len(before):] if text.startswith(before) else text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
