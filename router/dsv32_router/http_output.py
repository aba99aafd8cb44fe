"""``GenerateResponse`` messages → OpenAI completion / chat-completion objects and chunks.

One :class:`ChoiceBuilder` per HTTP request, fed the router's messages in
order: :meth:`~ChoiceBuilder.chunks` for streaming (``chat.completion.chunk``
or ``text_completion``), :meth:`~ChoiceBuilder.add` then
:meth:`~ChoiceBuilder.whole` for one answer. Reasoning (thinking mode) and
tool calls arrive already separated in the messages' ``reasoning_content``
and ``tool_calls`` (parsed by the router's :class:`~dsv32_router.stream.TokenStream`).
"""

from __future__ import annotations

import time

from dsv32_proto import serving_pb2
from .http_openai import HttpRequest


class ChoiceBuilder:
    def __init__(self, tokenizer, req: HttpRequest, served_name: str, chat: bool):
        self.tokenizer, self.req, self.chat = tokenizer, req, chat
        self.model = req.model or served_name
        self.created = int(time.time())
        self.id = ""
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict] = {}
        self.logprobs: list = []
        self.token_ids: list[int] = []
        self.text_offset = 0
        self.finish_reason: str | None = None
        self.usage: serving_pb2.Usage | None = None

    # -- pieces ---------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, out: serving_pb2.GenerateResponse) -> dict | None:
        if not self.req.logprobs or not out.logprobs:
            return None
        n = self.req.top_logprobs
        if self.chat:
            content = []
            for lp in out.logprobs:
                tok = self._token(lp.token_id)
                content.append({"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
                                "top_logprobs": [{"token": (t := self._token(x.token_id)), "logprob": x.logprob,
                                                  "bytes": list(t.encode())} for x in lp.top[:n]]})
            return {"content": content}
        tokens, offsets = [], []
        for lp in out.logprobs:
            tokens.append(self._token(lp.token_id))
            offsets.append(self.text_offset)
            self.text_offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in out.logprobs],
                "top_logprobs": [{self._token(x.token_id): x.logprob for x in lp.top[:n]} for lp in out.logprobs],
                "text_offset": offsets}

    def _usage(self) -> dict | None:
        if self.usage is None:
            return None
        u = self.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def _finish(self, reason: str) -> str:
        if reason == "stop" and self.tool_calls:
            return "tool_calls"
        return reason

    def _see(self, out: serving_pb2.GenerateResponse) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + out.request_id
        if out.HasField("usage"):
            self.usage = out.usage
        self.token_ids.extend(out.token_ids)
        for call in out.tool_calls:
            slot = self.tool_calls.setdefault(call.index, {"id": "", "type": "function",
                                                           "function": {"name": "", "arguments": ""}})
            slot["id"] = slot["id"] or call.id
            slot["function"]["name"] += call.name
            slot["function"]["arguments"] += call.arguments

    def _chunk(self, choice: dict, out: serving_pb2.GenerateResponse) -> dict:
        if self.req.return_token_ids:
            choice["token_ids"] = list(out.token_ids)
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    # -- streaming ------------------------------------------------------------
    def start(self) -> list[dict]:
        return []

    def chunks(self, out: serving_pb2.GenerateResponse) -> list[dict]:
        first = not self.id
        self._see(out)
        lp = self._logprobs(out)
        finish = self._finish(out.finish_reason) if out.finish_reason else None
        if finish:
            self.finish_reason = finish
        # a message whose tokens decode to no text yet (an incomplete UTF-8 sequence, a held-back stop
        # prefix) still carries token ids: a client that asked for them must get every one
        ids = self.req.return_token_ids and len(out.token_ids) > 0
        if not self.chat:
            if not out.text and lp is None and not finish and not ids:
                return []
            return [self._chunk({"index": 0, "text": out.text, "logprobs": lp, "finish_reason": finish}, out)]
        delta: dict = {"role": "assistant"} if first else {}
        if out.reasoning_content:
            delta["reasoning_content"] = out.reasoning_content
        if out.text:
            delta["content"] = out.text
        if out.tool_calls:
            delta["tool_calls"] = [
                {"index": c.index, **({"id": c.id, "type": "function"} if c.id else {}),
                 "function": {**({"name": c.name} if c.name else {}), "arguments": c.arguments}}
                for c in out.tool_calls]
        if first and "content" not in delta and "reasoning_content" not in delta:
            delta["content"] = ""
        if not delta and lp is None and not finish and not ids:
            return []
        return [self._chunk({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}, out)]

    def end(self) -> list[dict]:
        if not self.req.include_usage:
            return []
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return [{"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                 "usage": self._usage()}]

    # -- whole answer ---------------------------------------------------------
    def add(self, out: serving_pb2.GenerateResponse) -> None:
        self._see(out)
        self.content.append(out.text)
        self.reasoning.append(out.reasoning_content)
        lp = self._logprobs(out)
        if lp is not None:
            self.logprobs.append(lp)
        if out.finish_reason:
            self.finish_reason = out.finish_reason

    def whole(self) -> dict:
        finish = self._finish(self.finish_reason or "stop")
        if self.chat:
            lp = {"content": [c for part in self.logprobs for c in part["content"]]} if self.logprobs else None
            message: dict = {"role": "assistant", "content": "".join(self.content)}
            if self.req.thinking:
                message["reasoning_content"] = "".join(self.reasoning)
            if self.tool_calls:
                message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
                if not message["content"]:
                    message["content"] = None
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion"
        else:
            lp = None
            if self.logprobs:
                lp = {k: [x for part in self.logprobs for x in part[k]]
                      for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
            choice = {"index": 0, "text": "".join(self.content), "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        if self.req.return_token_ids:
            choice["token_ids"] = self.token_ids
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self._usage()}

