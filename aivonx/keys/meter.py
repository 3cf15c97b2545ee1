"""Token counts read from a relayed answer as it passes, cheaply.

The relay hands each forwarded chunk to the exchange's observer and tells
it when the answer ended. A meter keeps the first chunk and the last two
(no copy, no parse per chunk) and, at the end, finds the counts where each
dialect puts them: Ollama's final chunk (`prompt_eval_count`,
`eval_count`), OpenAI's `usage` (`prompt_tokens`, `completion_tokens`),
the Responses API's and Anthropic's (`input_tokens`, `output_tokens`;
Anthropic's input count is in the first event). The counts sit at the end
of their line, so a search from the end finds them without parsing the
rest. An OpenAI stream without `usage` is counted from its content events
(one token each, as Ollama sends them) and marked estimated.

Adding a dialect is one entry in READERS.
"""
from __future__ import annotations

from dataclasses import dataclass

HEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class Reader:
    prompt: bytes                      # the field holding the prompt's tokens
    completion: bytes                  # ... and the answer's
    events: tuple[bytes, ...] = ()     # what marks a content event, to estimate
    empty: tuple[bytes, ...] = ()      # ... and what does not after all


READERS: dict[str, Reader] = {
    "ollama": Reader(b'"prompt_eval_count":', b'"eval_count":'),
    "openai": Reader(b'"prompt_tokens":', b'"completion_tokens":',
                     (b'"content":"', b'"text":"'), (b'"content":""', b'"text":""')),
    "responses": Reader(b'"input_tokens":', b'"output_tokens":',
                        (b'"type":"response.output_text.delta"',)),
    "anthropic": Reader(b'"input_tokens":', b'"output_tokens":',
                        (b'"type":"content_block_delta"',)),
}


def _last_int(data: bytes, name: bytes) -> int | None:
    at = data.rfind(name)
    if at < 0:
        return None
    at += len(name)
    end = len(data)
    while at < end and data[at] in b" \t":
        at += 1
    start = at
    while at < end and 48 <= data[at] <= 57:
        at += 1
    return int(data[start:at]) if at > start else None


class Meter:
    """The relay's observer for one request: `chunk` per forwarded chunk,
    `end` once the answer is over; then `prompt`, `completion`,
    `estimated`, `ok` and `node_seconds` say what it cost."""

    __slots__ = ("reader", "head", "prev", "last", "events", "status", "ok",
                 "node_seconds", "ended", "prompt_estimate", "prompt", "completion",
                 "estimated")

    def __init__(self, style: str, prompt_estimate: int = 0) -> None:
        self.reader = READERS.get(style, READERS["ollama"])
        self.head = b""
        self.prev = b""
        self.last = b""
        self.events = 0
        self.status = 0
        self.ok = False
        self.node_seconds = 0.0
        self.ended = False
        self.prompt_estimate = prompt_estimate
        self.prompt = self.completion = 0
        self.estimated = False

    def chunk(self, data: bytes) -> None:
        if not self.head:
            self.head = data[:HEAD_BYTES]
        self.prev, self.last = self.last, data
        reader = self.reader
        if reader.events:
            for marker in reader.events:
                self.events += data.count(marker)
            for marker in reader.empty:
                self.events -= data.count(marker)

    def end(self, status: int, node_seconds: float, failed: bool) -> None:
        self.ended = True
        self.status = status
        self.node_seconds = node_seconds
        tail = self.prev + self.last
        self.ok = 200 <= status < 300 and not failed and b'"error"' not in self.last
        reader = self.reader
        prompt = _last_int(tail, reader.prompt)
        if prompt is None:
            prompt = _last_int(self.head, reader.prompt)
        completion = _last_int(tail, reader.completion)
        if completion is None and reader is READERS["ollama"] and prompt is not None:
            completion = 0  # an embedding: a prompt and no completion
        if prompt is None and completion is None and self.events:
            self.estimated = True
            prompt, completion = self.prompt_estimate, self.events
        self.prompt = prompt or 0
        self.completion = completion or 0
        self.head = self.prev = self.last = b""
