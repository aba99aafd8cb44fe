"""Offline API: continuous batching, sampling semantics, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints import tiny_checkpoint
from dsv32_engine import LLM, SamplingParams
from dsv32_engine.config import ConfigError, ModelConfig
from dsv32_engine.engine import PromptTooLong
from dsv32_engine.weights import CheckpointError


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_checkpoint("bf16", seed=0), num_pages=40, max_num_batched_tokens=256)


def prompts():
    g = torch.Generator().manual_seed(7)
    return ["Hello", "The quick brown fox jumps over the lazy dog.",
            torch.randint(100, 120000, (150,), generator=g).tolist(),   # several pages, > index_topk, chunked
            torch.randint(100, 120000, (300,), generator=g).tolist()]


def test_batched_generation_equals_each_request_alone(llm):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts(), sp)
    alone = [llm.generate([p], sp)[0] for p in prompts()]
    for t, a in zip(together, alone):
        assert t.outputs[0].token_ids == a.outputs[0].token_ids
        assert len(t.outputs[0].token_ids) == 12 and t.outputs[0].finish_reason == "length"
    llm.engine.allocator.check_no_leaks()
    assert llm.engine.stats["forward_calls"] > 0


def test_preemption_under_page_pressure_gives_the_same_tokens():
    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = [list(range(1000 + i, 1060 + i)) for i in range(4)]
    roomy_llm = LLM(ckpt, num_pages=32)
    roomy = roomy_llm.generate(ps, sp)
    assert roomy_llm.engine.scheduler.num_preemptions == 0
    tight_llm = LLM(ckpt, num_pages=5)  # 4 requests × 2 pages do not fit: someone is preempted and recomputed
    tight = tight_llm.generate(ps, sp)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    # a preempted request recomputes its prompt and outputs so far: more prefill work than the prompts alone
    assert tight_llm.engine.stats["prefill_tokens"] > sum(len(p) for p in ps)
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    tight_llm.engine.allocator.check_no_leaks()


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    p = "Once upon a time"
    a = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=16, ignore_eos=True))[0]
    b = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=16, ignore_eos=True))[0]
    c = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.95, seed=12, max_tokens=16, ignore_eos=True))[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids != c.outputs[0].token_ids


def test_greedy_is_deterministic_and_defaults_come_from_generation_config(llm):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate(["abc"], sp)[0].outputs[0].token_ids == llm.generate(["abc"], sp)[0].outputs[0].token_ids
    resolved = SamplingParams().with_defaults(llm.engine.generation_defaults)
    assert (resolved.temperature, resolved.top_p) == (1.0, 0.95)


def test_logprobs_hold_chosen_token_and_top_n(llm):
    out = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) == 3  # greedy: the chosen token is the top-1
        assert max(lp.values()) == lp[tok] and all(v <= 0 for v in lp.values())
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)))


def test_top_k_one_equals_greedy(llm):
    g = llm.generate(["xyz"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    k1 = llm.generate(["xyz"], SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=6, ignore_eos=True))[0]
    assert k1.outputs[0].token_ids == g


def test_stop_token_ids_and_stop_strings(llm):
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    base = llm.generate(["stop test"], sp)[0].outputs[0]
    third = base.token_ids[2]
    out = llm.generate(["stop test"], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[third]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:3] and out.finish_reason == "stop" and out.stop_reason == third
    assert out.text == llm.tokenizer.decode(base.token_ids[:2])  # the stop token stays out of the text
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        out = llm.generate(["stop test"], SamplingParams(temperature=0, max_tokens=10, stop=[stop]))[0].outputs[0]
        assert out.text == text[: text.index(stop)] and out.finish_reason == "stop"
    llm.engine.allocator.check_no_leaks()


def test_streaming_deltas_join_to_the_full_text(llm):
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    assert "".join(llm.stream("Stream me", sp)) == llm.generate(["Stream me"], sp)[0].outputs[0].text


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-2), "top_k"), (dict(logprobs=99), "logprobs"),
    (dict(seed=-1), "seed"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[10 ** 9]), "stop_token_ids"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_sampling_params_name_the_field(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(["ok", "fine"], SamplingParams(**kwargs))
    llm.engine.allocator.check_no_leaks()
    assert not llm.engine.has_unfinished()


def test_bad_prompts_are_rejected_before_anything_starts(llm):
    too_long = list(range(100, 100 + llm.engine.max_model_len))
    with pytest.raises(PromptTooLong, match="context"):
        llm.generate(["fine", too_long], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="token ids outside"):
        llm.generate([[5, 10 ** 7]], SamplingParams(max_tokens=2))
    llm.engine.allocator.check_no_leaks()
    assert not llm.engine.has_unfinished()
    assert llm.generate(["still works"], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids


def _copy(tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(tiny_checkpoint("bf16", seed=0), dst)
    return dst


def test_malformed_configs_name_the_problem(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for patch, msg in [({"hiden_size": 3}, "hiden_size"), ({"scoring_func": "softmax"}, "scoring_func"),
                       ({"model_type": "llama"}, "model_type"), ({"hidden_size": -1}, "hidden_size"),
                       ({"index_topk": None}, "index_topk"), ({"n_group": 5}, "n_group")]:
        (d / "config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(ConfigError, match=msg):
            ModelConfig.from_dir(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(d)


def test_deepseek_v3_config_runs_as_dense_mla(tmp_path):
    from checkpoints import as_deepseek_v3

    llm = LLM(as_deepseek_v3(tiny_checkpoint("bf16", seed=0), tmp_path / "v3"), num_pages=8)
    assert llm.engine.model.model.layers[0].self_attn.indexer is None
    out = llm.generate([list(range(500, 600))], SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3


def _rewrite_tensor(d, name, new):
    from safetensors.torch import load_file, save_file
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    if new is None:
        del tensors[name]
        del index["weight_map"][name]
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, shard)


def test_missing_tensor_and_wrong_shape_are_named(tmp_path):
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    d = _copy(tmp_path, "missing")
    _rewrite_tensor(d, name, None)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        LLM(str(d))
    d = _copy(tmp_path, "shape")
    _rewrite_tensor(d, name, torch.zeros(3, 512, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.*\[3, 512\].*\[1024, 512\]"):
        LLM(str(d))


def test_make_checkpoint_is_reproducible(tmp_path):
    from dsv32_engine.checkpoint_maker import make_checkpoint

    a = make_checkpoint(tmp_path / "a", "tiny", seed=9, shard_mb=8)
    b = make_checkpoint(tmp_path / "b", "tiny", seed=9, shard_mb=8)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in b.glob("*.safetensors"))
    assert all((a / s).read_bytes() == (b / s).read_bytes() for s in shards)
    c = make_checkpoint(tmp_path / "c", "tiny", seed=10, shard_mb=8)
    assert (a / shards[0]).read_bytes() != (c / shards[0]).read_bytes()
    assert (a / "tokenizer.json").is_file() and (a / "generation_config.json").is_file()


def test_disaggregated_prefill_then_decode_equals_offline():
    """prefill() on one engine (layer-major, attention in query blocks), pages copied, decode on another."""
    from dsv32_engine.engine import EngineCore, PrefillInput

    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ps = [list(range(1000, 1300)), list(range(2000, 2050))]
    ref = [o.outputs[0].token_ids for o in LLM(ckpt, num_pages=32).generate(ps, sp)]
    P, D = EngineCore(ckpt, num_pages=32, max_num_batched_tokens=64), EngineCore(ckpt, num_pages=32)
    pages = [P.allocator.allocate(P.layout.pages_for(len(p))) for p in ps]
    done: list[int] = []
    firsts = P.prefill([PrefillInput(f"r{i}", p, sp, pg) for i, (p, pg) in enumerate(zip(ps, pages))], done.append)
    assert done == list(range(P.config.num_hidden_layers))  # every layer handed over once, in order
    outs = {}
    for i, (p, pg) in enumerate(zip(ps, pages)):
        dst = D.allocator.allocate(len(pg))
        for layer in range(P.config.num_hidden_layers):
            D.cache.latent[layer][dst] = P.cache.latent[layer][pg]
            D.cache.index[layer][dst] = P.cache.index[layer][pg]
        D.add_prefilled(f"r{i}", p, sp, dst, firsts[i])
        outs[f"r{i}"] = [firsts[i].token_id]
        P.allocator.free(pg)
    while D.has_unfinished():
        for o in D.step():
            outs[o.request_id].append(o.token_id)
    assert [outs["r0"], outs["r1"]] == ref
    assert D.stats["prefill_tokens"] == 0  # the decode engine never ran the prompts
    P.allocator.check_no_leaks()
    D.allocator.check_no_leaks()


def test_prefill_in_chunks_equals_one_pass():
    """prefill() with ``start``/``end``: a prompt computed in three chunks (each in a batch with another
    prompt's whole prefill) leaves the same cache and the same first token as one pass. (The same values,
    not the same bits: a CPU matrix product's rounding depends on how many rows it multiplies.)"""
    from dsv32_engine.engine import EngineCore, PrefillInput

    ckpt = tiny_checkpoint("bf16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    long, short = list(range(1000, 1300)), list(range(2000, 2020))
    A, B = EngineCore(ckpt, num_pages=32), EngineCore(ckpt, num_pages=32)
    pa = A.allocator.allocate(A.layout.pages_for(len(long)))
    (ref,) = A.prefill([PrefillInput("r", long, sp, pa)])
    pb = B.allocator.allocate(B.layout.pages_for(len(long)))
    cuts = [0, 96, 200, len(long)]
    firsts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        ps = B.allocator.allocate(B.layout.pages_for(len(short)))
        out = B.prefill([PrefillInput("r", long, sp, pb, start=a, end=b), PrefillInput(f"s{i}", short, sp, ps)])
        firsts.append(out[0])
        assert out[1] is not None
        B.allocator.free(ps)
    assert firsts[:2] == [None, None] and firsts[2].token_id == ref.token_id
    n = len(long)
    for layer in range(A.config.num_hidden_layers):
        for pool in ("latent", "index"):
            got = getattr(B.cache, pool)[layer][pb].flatten(0, 1)[:n]
            want = getattr(A.cache, pool)[layer][pa].flatten(0, 1)[:n]
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4, msg=f"{pool} {layer}")
    with pytest.raises(ValueError, match="chunk"):
        B.prefill([PrefillInput("bad", long, sp, pb, start=10, end=5)])
