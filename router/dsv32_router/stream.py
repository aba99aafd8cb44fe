"""Generated tokens → client messages: incremental detokenization and stop strings.

Text deltas only ever contain whole characters (the detokenizer holds back a
partial UTF-8 sequence) and never text that a stop string could still claim:
while a stop string may be forming, its possible prefix is held back; once
one appears, the text is cut before it and the stream finishes with
``stop``. The EOS token (unless ``ignore_eos``) and ``stop_token_ids`` end
the stream with ``stop``; their ids are reported but add no text.
"""

from __future__ import annotations

from dsv32_text.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
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
        if not ids and not delta and not self.finish_reason:
            return None
        out = serving_pb2.GenerateResponse(request_id=self.req.request_id, text=delta, token_ids=ids,
                                           logprobs=logprobs)
        if self.finish_reason:
            out.finish_reason = self.finish_reason
        return out
