"""Streaming DSML tool-call parser: generated content → text and OpenAI tool-call pieces.

The answer's content (after any reasoning) may end with a DSML block
(docs/deepseek_v32_spec.md §10-11)::

    \\n\\n<｜DSML｜function_calls>\\n<｜DSML｜invoke name="f">\\n
    <｜DSML｜parameter name="k" string="true">raw text</｜DSML｜parameter>\\n ...
    </｜DSML｜invoke>\\n</｜DSML｜function_calls>

:class:`ToolCallParser` takes the text in any chunking and returns events:
``("content", text)``, ``("call", index, name)`` when an invoke's name is
complete, ``("args", index, fragment)`` as its arguments JSON grows: ``{`` and
the key at each parameter's header, a string value's characters (JSON-escaped)
as they arrive, a JSON value once its parameter closes (it must parse), and
``}`` at ``</｜DSML｜invoke``. The arguments are rebuilt as the strict parser of
:mod:`dsv32_text.encoding` rebuilds them, so a well-formed block gives the
same calls.

Chunking never changes the result: the parser decides only on text it has
seen, waits when more text could change the decision (a possible marker at
the end is held back), and never takes a decision back.

Malformed or truncated markup (unknown parameter kind, bad JSON in a
``string="false"`` value, duplicate parameter, missing ``>\\n``, an invoke never
closed, a block never closed) is never lost and raises nothing: from the end
of the last complete invoke (or from the block's start if none completed), the
raw text comes back as content. An invoke that was cut keeps the pieces
already streamed (its arguments then are not valid JSON; the stream's
finish reason says why, usually ``length``). Text after the block is content.
"""

from __future__ import annotations

import json

from .encoding import DSML

CALLS_START = f"\n\n<{DSML}function_calls"
CALLS_END = f"</{DSML}function_calls>"
INVOKE_START, INVOKE_END = f"<{DSML}invoke", f"</{DSML}invoke"
PARAM_START, PARAM_CLOSE = f"<{DSML}parameter", f"</{DSML}parameter"
MAX_NAME = 256
MAX_JSON_VALUE = 1 << 20


def _held(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class _Wait(Exception):
    """More text is needed to decide."""


class _Bad(Exception):
    """Malformed markup at the current position."""


class ToolCallParser:
    def __init__(self):
        self.text = ""
        self.pos = 0  # everything before is decided
        self.state = "content"  # content | block | after_invoke | invoke | param_sep | done
        self.safe = 0  # where raw text resumes as content on failure
        self.index = -1  # current call
        self.keys: set[str] = set()
        self.value_kind = ""  # "true" | "false" while inside a parameter value
        self.value = ""
        self.final = False

    # -- public ---------------------------------------------------------------
    def feed(self, text: str) -> list[tuple]:
        self.text += text
        return self._run()

    def finish(self) -> list[tuple]:
        self.final = True
        return self._run()

    @property
    def calls(self) -> int:
        return self.index + 1

    # -- matching helpers -------------------------------------------------------
    def _expect(self, *literals: str) -> str:
        rest = self.text[self.pos:]
        for lit in literals:
            if rest.startswith(lit):
                self.pos += len(lit)
                return lit
        if not self.final and any(lit.startswith(rest) for lit in literals):
            raise _Wait
        raise _Bad

    def _until(self, end: str, limit: int) -> str:
        j = self.text.find(end, self.pos)
        if j < 0 or j - self.pos > limit:
            if self.final or len(self.text) - self.pos > limit + len(end):
                raise _Bad
            raise _Wait
        out, self.pos = self.text[self.pos:j], j + len(end)
        return out

    # -- the machine ------------------------------------------------------------
    def _run(self) -> list[tuple]:
        events: list[tuple] = []
        while True:
            start_pos, start_state, step = self.pos, self.state, []
            try:
                if self.state == "content":
                    more = self._content(events)
                elif self.state == "done":
                    if self.pos < len(self.text):
                        events.append(("content", self.text[self.pos:]))
                        self.pos = len(self.text)
                    more = False
                else:
                    more = self._step(step)
                    events += step
            except _Wait:  # nothing of this step happened
                self.pos, self.state = start_pos, start_state
                return events
            except _Bad:
                if self.safe < len(self.text):
                    events.append(("content", self.text[self.safe:]))
                self.pos = self.safe = len(self.text)
                self.state, more = "done", False
            if not more:
                return events

    def _content(self, events: list) -> bool:
        j = self.text.find(CALLS_START, self.pos)
        if j >= 0:
            if j > self.pos:
                events.append(("content", self.text[self.pos:j]))
            self.pos = self.safe = j
            self.pos += len(CALLS_START)
            self.state = "block"
            return True
        end = len(self.text) if self.final else len(self.text) - _held(self.text[self.pos:], CALLS_START)
        if end > self.pos:
            events.append(("content", self.text[self.pos:end]))
            self.pos = end
        return False

    def _step(self, events: list) -> bool:
        """One step of the block; False when it consumed what there is (committed) and waits."""
        s = self.state
        if s == "block":  # after "<｜DSML｜function_calls" or after an invoke's "</｜DSML｜invoke"
            self._expect(">\n")
            if self._expect(INVOKE_START, CALLS_END) == CALLS_END:
                if self.index < 0:  # a block without any invoke is not a tool call
                    raise _Bad
                self.safe, self.state = self.pos, "done"
                return True
            self._expect(' name="')
            name = self._until('">\n', MAX_NAME)
            self.index += 1
            self.keys = set()
            events.append(("call", self.index, name))
            self.state = "invoke"
        elif s == "invoke":  # expecting a parameter or the invoke's end
            first = not self.keys
            if self._expect(PARAM_START, INVOKE_END, "\n" + INVOKE_END) != PARAM_START:
                events.append(("args", self.index, "{}" if first else "}"))
                self.safe, self.state = self.pos, "block"
                return True
            self._expect(' name="')
            key = self._until('" string="', MAX_NAME)
            kind = self._expect('true">', 'false">')[:-2]
            if key in self.keys:
                raise _Bad
            self.keys.add(key)
            events.append(("args", self.index, ("{" if first else ", ") + json.dumps(key, ensure_ascii=False) + ": "
                           + ('"' if kind == "true" else "")))
            self.value_kind, self.value, self.state = kind, "", "value"
        elif s == "value":
            return self._value(events)
        elif s == "param_sep":
            self._expect(">\n")
            self.state = "invoke"
        return True

    def _value(self, events: list) -> bool:
        """A parameter's value up to ``</｜DSML｜parameter``; what is certain is consumed at once."""
        j = self.text.find(PARAM_CLOSE, self.pos)
        if j < 0 and self.final:
            raise _Bad
        end = j if j >= 0 else len(self.text) - _held(self.text[self.pos:], PARAM_CLOSE)
        piece, self.pos = self.text[self.pos:end], end
        if self.value_kind == "true":
            if piece:
                events.append(("args", self.index, json.dumps(piece, ensure_ascii=False)[1:-1]))
        else:
            self.value += piece
            if len(self.value) > MAX_JSON_VALUE:
                raise _Bad
        if j < 0:
            return False
        self.pos += len(PARAM_CLOSE)
        if self.value_kind == "false":
            try:
                json.loads(self.value)
            except ValueError:
                raise _Bad from None
            events.append(("args", self.index, self.value))
        else:
            events.append(("args", self.index, '"'))
        self.state = "param_sep"
        return True


def parse_all(text: str) -> tuple[str, list[dict]]:
    """The whole text at once: (content, [{"name", "arguments"}])."""
    p = ToolCallParser()
    return collect(p.feed(text) + p.finish())


def collect(events: list[tuple]) -> tuple[str, list[dict]]:
    content, calls = [], []
    for ev in events:
        if ev[0] == "content":
            content.append(ev[1])
        elif ev[0] == "call":
            calls.append({"name": ev[2], "arguments": ""})
        else:
            calls[ev[1]]["arguments"] += ev[2]
    return "".join(content), calls
