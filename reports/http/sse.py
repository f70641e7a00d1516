"""Server-sent events from a byte stream: `data: ...` messages split on blank lines."""

from __future__ import annotations

import codecs


class SseSplitter:
    """Bytes in, complete messages out (their `data: ` payloads; comments dropped)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._decoder.decode(chunk).replace("\r\n", "\n")
        *complete, self._buffer = self._buffer.split("\n\n")
        return [data for message in complete if (data := _data(message)) is not None]


def _data(message: str) -> str | None:
    lines = [line[5:].lstrip(" ") for line in message.split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None
