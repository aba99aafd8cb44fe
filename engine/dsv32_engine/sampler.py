"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Sampling draws exponential noise and takes ``argmax(p / noise)`` (the
Gumbel-max trick in another guise) instead of calling ``multinomial``. The
noise of the token at position ``pos`` comes from a generator seeded by
``(seed, pos)``, so a request sampled partly on a prefill worker and partly on
a decode worker — or preempted and recomputed — draws the same tokens as it
would in one process.

This is not sync-free: rows are sampled one at a time in Python and each chosen
id is read back to the host (``int(...)``), one device-to-host sync per request
per step, plus one per value in ``top_logprobs``. Keeping the ids on the device
(one batched draw, one read per step) is still to be written.
"""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15


def position_generator(seed: int, pos: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * _MIX + pos * 0xBF58476D1CE4E5B9 + 1) % (1 << 63))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of one row after temperature, top-k and top-p."""
    x = logits / params.temperature
    k = params.top_k
    if k and 0 < k < x.shape[-1]:
        kth = x.topk(k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    p = params.top_p
    if p is not None and p < 1.0:
        sorted_x, order = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= p
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return x.softmax(-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           want_logprobs: bool) -> tuple[list[int], torch.Tensor | None]:
    """``logits [B, V]`` fp32 → chosen ids and (if asked) raw log-probs ``[B, V]``."""
    out = []
    for b, sp in enumerate(params):
        row = logits[b]
        if sp.greedy:
            out.append(int(row.argmax()))
            continue
        probs = filtered_probs(row, sp)
        noise = torch.empty_like(probs).exponential_(generator=position_generator(seeds[b], positions[b], row.device))
        out.append(int((probs / noise).argmax()))
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    return out, logprobs


def top_logprobs(logprobs_row: torch.Tensor, token: int, n: int) -> tuple[float, dict[int, float]]:
    """The chosen token's log-prob and a dict holding it plus the top-n."""
    chosen = float(logprobs_row[token])
    top = {}
    if n:
        vals, ids = logprobs_row.topk(n)
        top = {int(i): float(v) for i, v in zip(ids, vals)}
    top[token] = chosen
    return chosen, top
