"""Offline generation: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``.

All prompts are validated before any starts (a bad one raises and nothing is
left in the engine), then run together through continuous batching.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from dsv32_text.detokenizer import IncrementalDetokenizer, find_stop
from .engine import EngineCore, StepOutput
from .engine_config import EngineConfig
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | EngineConfig, **options):
        """``LLM(model=DIR, num_pages=..., numerics=...)``: the options are the ``EngineConfig``
        fields (documented there); or ``LLM(EngineConfig(...))``."""
        self.engine = EngineCore(EngineConfig.of(model, **options))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def get_tokenizer(self):
        return self.tokenizer

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        return list(self._run(prompts, sampling_params, stream=False))

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt as they are generated."""
        yield from self._run([prompt], sampling_params, stream=True)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None, thinking: bool = False,
             tools: list[dict] | None = None) -> RequestOutput:
        from dsv32_text.encoding import render_prompt_ids
        ids = render_prompt_ids(self.tokenizer, messages, "thinking" if thinking else "chat", tools=tools)
        return self.generate([ids], sampling_params)[0]

    def _run(self, prompts, sampling_params, stream: bool):
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        parsed = [self._prompt_ids(p) for p in prompts]
        eng = self.engine
        reqs = [eng._make_request(f"offline-{self._counter + i}", ids, sp) for i, ((_, ids), sp) in enumerate(zip(parsed, params))]
        self._counter += len(reqs)
        state = {}
        for (text, ids), req in zip(parsed, reqs):
            eng._requests[req.request_id] = req
            eng.scheduler.waiting.append(req)
            state[req.request_id] = _Collect(req.request_id, text, ids, req.params, self.tokenizer)
        try:
            while eng.has_unfinished():
                for out in eng.step():
                    st = state.get(out.request_id)
                    if st is None:
                        continue
                    delta = st.add(out)
                    if st.stopped_by_string and not out.finished:
                        eng.abort(out.request_id)
                    if stream and delta:
                        yield delta
        except BaseException:
            for rid in state:
                eng.abort(rid)
            raise
        if not stream:
            yield from (st.result() for st in state.values())


class _Collect:
    """Accumulates one request's tokens, text and log-probs; applies stop strings."""

    def __init__(self, rid: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, tokenizer):
        self.rid, self.prompt, self.prompt_ids, self.params = rid, prompt, prompt_ids, params
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.eos_token_id = tokenizer.eos_token_id
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cum = 0.0
        self.cached = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.stopped_by_string = False

    def add(self, out: StepOutput) -> str:
        if self.finish_reason is not None:
            return ""
        self.token_ids.append(out.token_id)
        if out.cached_tokens is not None:
            self.cached = out.cached_tokens
        if self.logprobs is not None:
            self.logprobs.append(out.top_logprobs or {})
            self.cum += out.logprob or 0.0
        before = len(self.text)
        # EOS and stop tokens end the request and stay in token_ids, but not in the text (as the router streams it)
        ends = out.finished and out.finish_reason == "stop" and (
            out.token_id == self.eos_token_id or out.token_id in self.params.stop_token_ids)
        if not ends:
            self.text += self.detok.add(out.token_id)
        if out.finished:
            self.text += self.detok.flush()
            self.finish_reason = out.finish_reason
            if out.token_id in self.params.stop_token_ids:
                self.stop_reason = out.token_id
        if self.params.stop:
            cut = find_stop(self.text, self.params.stop, max(0, before - max(map(len, self.params.stop))))
            if cut is not None:
                self.stop_reason = next(s for s in self.params.stop if self.text.startswith(s, cut))
                self.text = self.text[:cut]
                self.finish_reason, self.stopped_by_string = "stop", True
                return self.text[before:] if cut > before else ""
        return self.text[before:]

    def result(self) -> RequestOutput:
        comp = CompletionOutput(0, self.text, self.token_ids, self.logprobs, self.finish_reason or "abort",
                                self.stop_reason, self.cum if self.logprobs is not None else None)
        return RequestOutput(self.rid, self.prompt, self.prompt_ids, [comp], num_cached_tokens=self.cached)
