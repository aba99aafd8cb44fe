"""EngineCore: model + paged cache + scheduler + sampler, one process.

Used three ways: offline (``LLM``), colocated serving (``add_request`` /
``step``), and disaggregated serving, where a prefill worker calls
``prefill`` (cache written into pages it owns, ``on_layer_done`` fired per
layer so the KV sender can overlap transfer with compute) and a decode worker
calls ``add_prefilled`` (cache already received into its pages) then
``step``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cache import KVCache, PageAllocator
from .config import ModelConfig
from .engine_config import EngineConfig
from dsv32_kernels.layout import CacheLayout
from .parallel import EPConfig, EPGroup
from .model import DeepseekV32ForCausalLM, ForwardBatch, SeqSpan, resolve_backend
from .sampler import sample, top_logprobs
from .sampling_params import SamplingParams
from .scripted import ScriptedOutput
from dsv32_text.prefix_hash import page_hashes
from .prefix_cache import PrefixCaching
from .scheduler import Request, ScheduledChunk, Scheduler
from .weights import load_weights, resident_weight_bytes

DEFAULT_CACHE_BYTES = 256 << 20


@dataclass
class StepOutput:
    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finished: bool = False
    finish_reason: str | None = None
    cached_tokens: int | None = None
    """On a request's first token: its prompt tokens that came from the prefix cache."""


@dataclass
class PrefillInput:
    """One prompt for :meth:`EngineCore.prefill`. ``start``: tokens whose cache already sits in
    ``page_ids`` (an earlier chunk, or a cached prefix); ``end``: compute up to this position (None:
    the whole prompt). Only a chunk that reaches the prompt's end samples the first token."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    page_ids: list[int]
    start: int = 0
    end: int | None = None

    @property
    def stop(self) -> int:
        return len(self.prompt_ids) if self.end is None else self.end

    @property
    def is_last(self) -> bool:
        return self.stop == len(self.prompt_ids)


class PromptTooLong(ValueError):
    pass


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's check: AVX512-BF16 or AMX on x86)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "auto":  # fp32 products slow down per row as the batch grows on CPU; native bf16 ones do not
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]


def _fingerprint(model_dir) -> str:
    """What identifies a checkpoint's numbers: its config and its weight files' names and sizes."""
    d = Path(model_dir)
    parts = [(d / "config.json").read_text() if (d / "config.json").is_file() else ""]
    parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(d.glob("*.safetensors"))]
    return "|".join(parts)


class EngineCore:
    def __init__(self, config: EngineConfig | str | Path, *, ep: EPConfig | None = None, **options):
        """``EngineCore(EngineConfig(...))``, or ``EngineCore(model_dir, **options)`` with the
        ``EngineConfig`` fields as options (``num_pages=32``...)."""
        self.engine_config = ec = EngineConfig.of(config, **options)
        model_dir, numerics, dtype, device, seed = ec.model, ec.numerics, ec.dtype, ec.device, ec.seed
        num_pages, max_num_seqs, max_num_batched_tokens = ec.num_pages, ec.max_num_seqs, ec.max_num_batched_tokens
        max_model_len, attention_backend = ec.max_model_len, ec.attention_backend
        self.model_dir = str(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _dtype(dtype, self.device)
        self.config = cfg = ModelConfig.from_dir(model_dir)
        self.numerics = numerics
        self.layout = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim or 128,
                                  mode=numerics, dtype=self.dtype)
        # "torch" (attention.py) or "kernels" (attention_kernels.py: dsv32_kernels ops, Triton on CUDA)
        self.attention_backend = resolve_backend(attention_backend, self.device)
        # Expert parallelism: the placement is checked before anything is loaded or joined.
        placement = ep.make_placement(cfg.n_routed_experts or 0) if ep is not None else None
        self.ep = EPGroup(ep, self.device) if ep is not None else None
        with torch.device("meta"):
            self.model = DeepseekV32ForCausalLM(cfg, self.layout, self.attention_backend, self.ep, placement)
        load_weights(self.model, cfg, model_dir, self.dtype, self.device,
                     placement.local_experts(ep.rank) if placement is not None else None,
                     weight_format=ec.weight_format)
        self.model.eval()
        self.weight_bytes = resident_weight_bytes(self.model)
        self.group_idle = True  # after a step: no rank of the group (this engine alone without EP) had work
        from dsv32_text.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(self.model_dir)
        self.sampleable_vocab = min(cfg.vocab_size, self.tokenizer.vocab_size)
        self._script = ScriptedOutput.from_env(self.tokenizer, cfg.eos_token_id)
        self.max_model_len = min(cfg.max_position_embeddings, max_model_len or cfg.max_position_embeddings)
        from dsv32_text.generation_config import GenerationConfig
        self.generation_defaults = GenerationConfig.from_dir(model_dir).sampling_defaults()
        if num_pages is None:
            num_pages = KVCache.pages_that_fit(self.layout, cfg.num_hidden_layers, DEFAULT_CACHE_BYTES)
        self.cache = KVCache(self.layout, cfg.num_hidden_layers, num_pages, self.device, with_index=cfg.has_indexer)
        self.allocator = PageAllocator(num_pages)
        # (on CUDA the fp8 weight path rounds activations: its pages differ from the dequantised path's)
        self.cache_salt = PrefixCaching.salt_for(_fingerprint(model_dir), numerics, f"{self.dtype}/{ec.weight_format}",
                                                 self.layout.page_size)
        self.prefix = PrefixCaching(self.allocator, self.layout.page_size, self.cache_salt) if ec.prefix_caching \
            else None
        self.scheduler = Scheduler(self.allocator, self.layout.page_size, max_num_seqs, max_num_batched_tokens,
                                   self.prefix)
        self.max_num_batched_tokens = max_num_batched_tokens
        self._requests: dict[str, Request] = {}
        self._grammars: dict[str, object] = {}  # request id -> Grammar (structured output)
        self._grammar_tokenizer = None  # built at the first constrained request
        self._rng = random.Random(seed)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "forward_calls": 0, "idle_forwards": 0,
                      "cached_tokens": 0}

    # -- requests ------------------------------------------------------------------
    def _make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_ids)
        params = params.with_defaults(self.generation_defaults).validate(self.config.vocab_size)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        if params.json_schema:
            self._grammars[request_id] = self._grammar(params, prompt_ids)
        req = Request(request_id, list(prompt_ids), params, seed)
        req.cacheable = self.prefix is not None and not params.skip_prefix_cache
        return req

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt holds token ids outside [0, {self.config.vocab_size}): {bad[:5]}")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(f"prompt has {len(prompt_ids)} tokens; the model context is {self.max_model_len}")

    def _grammar(self, params: SamplingParams, prompt_ids: list[int]):
        from .grammar import GrammarTokenizer

        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer.backend.to_str(), self.config.vocab_size,
                                                       self.config.eos_token_id)
        n = params.grammar_replay
        return self._grammar_tokenizer.grammar(params.json_schema, list(prompt_ids[len(prompt_ids) - n:]) if n else [])

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cached_pages: list[int] | None = None) -> None:
        """``cached_pages``: pages of the prompt's leading tokens that the caller acquired from the prefix
        cache (``match_prefix``); the engine takes them over and computes only the rest."""
        req = self._make_request(request_id, prompt_ids, params)
        if cached_pages:
            n = len(cached_pages) * self.layout.page_size
            if n >= len(prompt_ids):
                raise ValueError(f"request {request_id}: {len(cached_pages)} cached pages cover the whole prompt; "
                                 "its last token must be computed")
            req.pages = list(cached_pages)
            req.num_computed = req.num_published = req.num_cached = n
        self._requests[request_id] = req
        self.scheduler.waiting.append(req)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], params: SamplingParams, page_ids: list[int],
                      first: StepOutput) -> None:
        """Admit a request whose prompt cache already sits in ``page_ids`` (now owned by the engine)."""
        req = self._make_request(request_id, prompt_ids, params)
        req.pages, req.num_computed = list(page_ids), len(prompt_ids)
        self.scheduler.publish([req])
        req.output_ids.append(first.token_id)
        self._requests[request_id] = req
        if request_id in self._grammars:
            self._grammars[request_id].consume(first.token_id)
        reason = self._stop_reason(req, first.token_id)
        if reason:
            self._finish(req, reason)
        else:
            self.scheduler.running.append(req)

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        self._grammars.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One continuous-batching step. In an EP group every rank must call it in lockstep (each
        step is one forward, possibly an idle one); ``group_idle`` tells the caller to wait for work."""
        chunks = self.scheduler.schedule()
        if not self._agree(bool(chunks)):
            return []
        if not chunks:
            self._idle_forward()  # a peer has work: join its MoE collectives with no tokens
            return []
        logits = self._forward(chunks)
        outs = self._sample([c.request for c in chunks if c.samples], logits)
        for c in chunks:
            c.request.num_computed = c.start + c.num
        self.scheduler.publish([c.request for c in chunks])
        for req, out in outs:
            if not req.output_ids:
                out.cached_tokens = req.num_cached
                self.stats["cached_tokens"] += req.num_cached
            req.output_ids.append(out.token_id)
            reason = self._stop_reason(req, out.token_id)
            if reason:
                self._finish(req, reason)
                out.finished, out.finish_reason = True, reason
        return [o for _, o in outs]

    @torch.inference_mode()
    def prefill(self, reqs: list[PrefillInput], on_layer_done: Callable[[int], None] | None = None
                ) -> list[StepOutput | None]:
        """Compute prompt caches into caller-owned pages; return each request's first token, or None
        for a chunk that stops short of its prompt's end (the caller prefills the rest later, with
        ``start`` at this chunk's end)."""
        states = []
        for r in reqs:
            if not 0 <= r.start < r.stop <= len(r.prompt_ids):
                raise ValueError(f"request {r.request_id}: chunk [{r.start}, {r.stop}) is not inside its "
                                 f"{len(r.prompt_ids)}-token prompt")
            if r.is_last:
                req = self._make_request(r.request_id, r.prompt_ids, r.params)
            else:  # a middle chunk samples nothing: no seed is drawn, no grammar built
                self._check_prompt(r.prompt_ids)
                req = Request(r.request_id, list(r.prompt_ids), r.params, 0)
            if len(r.page_ids) * self.layout.page_size < r.stop:
                raise ValueError(f"request {r.request_id}: {len(r.page_ids)} pages cannot hold {r.stop} tokens")
            req.pages, req.num_computed = list(r.page_ids), r.start
            req.cacheable = self.prefix is not None and not r.params.skip_prefix_cache
            states.append(req)
        # The whole batch runs as one layer-major forward: each layer's cache is complete (every token of
        # every chunk) when ``on_layer_done`` fires, so the KV sender overlaps the transfer of layer l with
        # the compute of layers > l even for long prompts. Attention is computed in query blocks of
        # ``max_num_batched_tokens`` so memory stays bounded.
        chunks = [ScheduledChunk(s, r.start, r.stop - r.start) for s, r in zip(states, reqs)]
        self._agree(True)
        logits = self._forward(chunks, on_layer_done, query_block=self.max_num_batched_tokens)
        results: dict[str, StepOutput] = {}
        for req, out in self._sample([c.request for c in chunks if c.samples], logits):
            out.finish_reason = self._stop_reason(req, out.token_id, first=True)
            out.finished = out.finish_reason is not None
            results[req.request_id] = out
        for c in chunks:
            c.request.num_computed = c.start + c.num
            self._grammars.pop(c.request.request_id, None)  # the decode worker rebuilds it (first token replayed)
        self.scheduler.publish([c.request for c in chunks])
        return [results.get(r.request_id) for r in reqs]

    def match_prefix(self, prompt_ids: list[int], params: SamplingParams | None = None,
                     acquire: bool = True) -> list[int]:
        """For a caller that owns a request's pages (the prefill worker, a decode worker's reservation):
        acquire the cached pages of the prompt's longest full-page prefix (at least its last token stays
        to compute). The caller owns a reference on each and frees them with the rest of its pages.
        ``acquire=False``: only look."""
        if self.prefix is None or (params is not None and params.skip_prefix_cache):
            return []
        return self.prefix.match(list(prompt_ids), acquire=acquire)

    def page_keys(self, token_ids: list[int]) -> list[str]:
        """Prefix-cache keys of the full pages of ``token_ids`` in this engine's cache."""
        return page_hashes(list(token_ids), self.layout.page_size, self.cache_salt)

    @torch.inference_mode()
    def idle_step(self) -> bool:
        """For a rank with nothing to run (a prefill rank between batches): join the group's step if a
        peer has work. Returns whether any rank had work; without EP, False at once."""
        if self.ep is None:
            self.group_idle = True
            return False
        busy = self._agree(False)
        if busy:
            self._idle_forward()
        return busy

    # -- internals -----------------------------------------------------------------------
    def _idle_forward(self) -> None:
        self.stats["idle_forwards"] += 1
        self.model.idle_forward()

    def _agree(self, mine: bool) -> bool:
        busy = self.ep.any_work(mine) if self.ep is not None else mine
        self.group_idle = not busy
        return busy

    def _forward(self, chunks: list[ScheduledChunk], on_layer_done=None, query_block: int | None = None) -> torch.Tensor:
        ids, pos, seqs, logit_rows = [], [], [], []
        for c in chunks:
            toks = c.request.all_ids[c.start:c.start + c.num]
            seqs.append(SeqSpan(len(ids), c.num, c.start + c.num,
                                torch.tensor(c.request.pages, dtype=torch.long, device=self.device)))
            ids += toks
            pos += range(c.start, c.start + c.num)
            if c.samples:
                logit_rows.append(len(ids) - 1)
            if c.num > 1 or c.start < len(c.request.prompt_ids):
                self.stats["prefill_tokens"] += c.num
            else:
                self.stats["decode_tokens"] += c.num
        dev = self.device
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        slot_mapping = torch.cat([s.block_table[torch.arange(s.context_len - s.num_new, s.context_len, device=dev)
                                                // self.layout.page_size] * self.layout.page_size
                                  + torch.arange(s.context_len - s.num_new, s.context_len, device=dev) % self.layout.page_size
                                  for s in seqs])
        batch = ForwardBatch(torch.tensor(ids, dtype=torch.long, device=dev), positions, slot_mapping, seqs,
                             torch.tensor(logit_rows, dtype=torch.long, device=dev), on_layer_done, query_block)
        self.stats["forward_calls"] += 1
        return self.model(batch, self.cache)

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[tuple[Request, StepOutput]]:
        if not reqs:
            return []
        want = any(r.params.logprobs is not None for r in reqs)
        # Reported log-probs are the model's distribution over its whole vocabulary (as vLLM reports raw
        # log-probs), so they are taken before the mask; only sampling skips the ids the tokenizer lacks.
        lps = torch.log_softmax(logits, dim=-1) if want else None
        if self.sampleable_vocab < logits.shape[-1]:  # never sample ids the tokenizer lacks
            logits[:, self.sampleable_vocab:] = float("-inf")
        grammars = [self._grammars.get(r.request_id) for r in reqs]
        for b, g in enumerate(grammars):  # structured output: rows of constrained requests only
            if g is not None:
                g.mask_(logits[b])
        if self._script is not None:  # test-only: a fixed answer (scripted.py)
            for b, r in enumerate(reqs):
                self._script.mask_(logits[b], len(r.output_ids))
        ids, _ = sample(logits, [r.params for r in reqs], [r.seed for r in reqs], [r.num_tokens for r in reqs], False)
        for g, tok in zip(grammars, ids):
            if g is not None:
                g.consume(tok)
        outs = []
        for b, (req, tok) in enumerate(zip(reqs, ids)):
            out = StepOutput(req.request_id, tok)
            if req.params.logprobs is not None:
                out.logprob, out.top_logprobs = top_logprobs(lps[b], tok, req.params.logprobs)
            outs.append((req, out))
        return outs

    def _stop_reason(self, req: Request, token: int, first: bool = False) -> str | None:
        p = req.params
        n_out = 1 if first else len(req.output_ids)
        if (token == self.config.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if n_out >= p.max_tokens or req.num_tokens + (1 if first else 0) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        self._requests.pop(req.request_id, None)
        self._grammars.pop(req.request_id, None)
