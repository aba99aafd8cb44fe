"""Generated tokens → client messages: incremental detokenization and stop strings.

Text deltas only ever contain whole characters (the detokenizer holds back a
partial UTF-8 sequence) and never text that a stop string could still claim:
while a stop string may be forming, its possible prefix is held back; once
one appears, the text is cut before it and the stream finishes with
``stop``. The EOS token (unless ``ignore_eos``) and ``stop_token_ids`` end
the stream with ``stop``; their ids are reported but add no text.
"""

from __future__ import annotations

import json
import uuid

from dsv32_text.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from dsv32_text.output_parser import ReasoningSplitter
from dsv32_text.tool_parser import ToolCallParser
from dsv32_proto import serving_pb2
from .validation import ResolvedRequest


class TokenStream:
    def __init__(self, tokenizer, req: ResolvedRequest, eos_token_id: int):
        self.req, self.eos_token_id = req, eos_token_id
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids)
        self.generated: list[int] = []
        self.text = ""  # detokenized so far
        self.sent = 0  # characters of self.text already streamed
        self.checked = 0  # characters of self.text already searched for stop strings
        self.finish_reason = ""
        self.split = ReasoningSplitter(req.thinking)  # thinking mode: reasoning_content apart from text
        self.tool_parser = ToolCallParser() if req.tools else None  # tools given: DSML → tool_calls
        self.announced_tool = False  # named tool choice: the call's id and name went out
        self.pending = ""  # tool choice "required": the JSON list so far

    def _ends_without_text(self, t) -> bool:
        sp = self.req.sampling
        return t.finished and t.finish_reason == "stop" and (
            t.token_id in sp.stop_token_ids or (t.token_id == self.eos_token_id and not sp.ignore_eos))

    def push(self, tokens) -> serving_pb2.GenerateResponse | None:
        """Take worker tokens (``worker.v1.Token``); the message to send, or None if nothing to say yet."""
        sp = self.req.sampling
        ids, logprobs = [], []
        for t in tokens:
            if self.finish_reason:
                break
            self.generated.append(t.token_id)
            ids.append(t.token_id)
            if t.HasField("logprobs"):
                logprobs.append(t.logprobs)
            if not self._ends_without_text(t):
                self.text += self.detok.add(t.token_id)
            if t.finished:
                self.finish_reason = t.finish_reason or "stop"
        if self.finish_reason:
            self.text += self.detok.flush()
        end = len(self.text)
        if sp.stop:
            hit = find_stop(self.text, sp.stop, start=self.checked)
            if hit is not None:
                end, self.finish_reason = hit, "stop"
            elif not self.finish_reason:
                end -= partial_stop_len(self.text, sp.stop)
            self.checked = len(self.text)
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        reasoning, delta = self.split.feed(delta)
        if self.finish_reason:
            r, c = self.split.finish()
            reasoning, delta = reasoning + r, delta + c
        calls = []
        if self.tool_parser is not None:
            delta, calls = self._tool_calls(delta)
        elif self.req.require_tool:  # a JSON list of calls, complete only at the end
            delta, calls = self._required_calls(delta)
        elif self.req.forced_tool and (delta or not self.announced_tool):  # the text is the call's arguments
            calls = [serving_pb2.ToolCallDelta(index=0, arguments=delta)]
            if not self.announced_tool:
                self.announced_tool = True
                calls[0].id, calls[0].name = f"call_{uuid.uuid4().hex[:24]}", self.req.forced_tool
            delta = ""
        if not ids and not delta and not reasoning and not calls and not self.finish_reason:
            return None
        out = serving_pb2.GenerateResponse(request_id=self.req.request_id, text=delta, token_ids=ids,
                                           logprobs=logprobs, reasoning_content=reasoning, tool_calls=calls)
        if self.finish_reason:
            tools_ended = self.finish_reason == "stop" and (
                self.req.forced_tool or self.announced_tool or self.tool_parser is not None and self.tool_parser.calls)
            out.finish_reason = "tool_calls" if tools_ended else self.finish_reason
        return out

    def _required_calls(self, content: str) -> tuple[str, list[serving_pb2.ToolCallDelta]]:
        """Tool choice "required": the calls once the JSON list is complete; text that does
        not parse (an answer cut by max_tokens) comes back as content, not lost."""
        self.pending += content
        if not self.finish_reason:
            return "", []
        try:
            calls = [serving_pb2.ToolCallDelta(index=k, id=f"call_{uuid.uuid4().hex[:24]}", name=c["name"],
                                               arguments=json.dumps(c["parameters"], ensure_ascii=False))
                     for k, c in enumerate(json.loads(self.pending))]
        except (ValueError, TypeError, KeyError):
            return self.pending, []
        self.announced_tool = bool(calls)
        return "", calls

    def _tool_calls(self, content: str) -> tuple[str, list[serving_pb2.ToolCallDelta]]:
        """Content delta → (text, tool-call pieces): see :mod:`dsv32_text.tool_parser`."""
        events = self.tool_parser.feed(content) + (self.tool_parser.finish() if self.finish_reason else [])
        text, calls = [], []
        for ev in events:
            if ev[0] == "content":
                text.append(ev[1])
            elif ev[0] == "call":
                calls.append(serving_pb2.ToolCallDelta(index=ev[1], id=f"call_{uuid.uuid4().hex[:24]}", name=ev[2]))
            elif calls and calls[-1].index == ev[1]:
                calls[-1].arguments += ev[2]
            else:
                calls.append(serving_pb2.ToolCallDelta(index=ev[1], arguments=ev[2]))
        return "".join(text), calls
