"""Reported log-probs are over the whole vocabulary; ids the tokenizer lacks are still never sampled."""

from __future__ import annotations

import math


from checkpoints import tiny_checkpoint
from dsv32_engine import LLM, SamplingParams


def test_lacked_ids_carry_mass_in_logprobs_but_are_never_sampled():
    llm = LLM(tiny_checkpoint("fp32", seed=0), num_pages=16, max_num_batched_tokens=128)
    eng = llm.engine
    lacked = eng.sampleable_vocab
    assert lacked < eng.config.vocab_size, "the tiny checkpoint's config has more ids than its tokenizer"
    forward = eng.model.forward

    def favour_lacked(*args, **kwargs):  # the model's favourites become ids the tokenizer lacks
        logits = forward(*args, **kwargs)
        logits[:, lacked:] += 30.0
        return logits

    eng.model.forward = favour_lacked
    prompt = [0, 128803, 33310, 128804]
    for params in (SamplingParams(temperature=0, max_tokens=4, logprobs=3),
                   SamplingParams(temperature=1.0, seed=3, max_tokens=4, logprobs=3)):
        out = llm.generate([prompt], params)[0].outputs[0]
        assert all(t < lacked for t in out.token_ids), "a lacked id was sampled"
        for lp, t in zip(out.logprobs, out.token_ids):
            best = max(lp, key=lp.get)
            assert best >= lacked, "the top log-prob is a lacked id: reported before the mask"
            assert lp[best] > math.log(0.5 / (eng.config.vocab_size - lacked)) and lp[t] < -10, \
                "the whole vocabulary's distribution, not one renormalised over the sampleable ids"
