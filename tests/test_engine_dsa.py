"""DSA that prunes (issue 13, item 2): the short-context fast path, and a sparse path whose cost follows top-k.

1. Fast path: a sequence whose context fits in ``index_topk`` skips the indexer. Its
   selection is every visible token, so the outputs must be *bit-identical* to the
   indexer path (``Attention.short_context_fast_path = False``): prefill, a chunked
   prefill whose chunk starts after cached tokens (what a prefix-cache hit runs), and
   batched decode of sequences of different lengths, on both attention backends and
   in both numerics modes. Both paths attend to the selected positions in ascending
   order, which is what makes the comparison exact rather than close.
2. Pruning: past top-k, the torch path reads only the selected latent rows from the
   pages (no dense materialisation of the context), and its paged indexer scores are
   ``Indexer.scores`` up to float rounding.
DSA at long contexts is unchanged: tests/test_engine_oracle.py, test_engine_paths.py and
test_engine_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

import dsv32_kernels as K
from checkpoints import tiny_checkpoint
from dsv32_engine import attention as A
from dsv32_engine import paged
from dsv32_engine.cache import KVCache
from dsv32_engine.config import ModelConfig
from dsv32_engine.model import DeepseekV32ForCausalLM, ForwardBatch, SeqSpan
from dsv32_engine.weights import load_weights
from dsv32_kernels.layout import CacheLayout


def _load(mode: str, backend: str):
    ckpt = tiny_checkpoint("fp32", seed=2)
    cfg = ModelConfig.from_dir(ckpt)
    layout = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim, mode=mode, dtype=torch.float32)
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, layout, backend)
    load_weights(model, cfg, ckpt, torch.float32)
    return model.eval(), cfg, layout


def _batch(chunks, record=None) -> ForwardBatch:
    """``chunks``: (ids, start, table) per sequence, flattened into one step; logits of every token."""
    ids, pos, slots, seqs, at = [], [], [], [], 0
    for tok, start, table in chunks:
        p = torch.arange(start, start + len(tok))
        ids += tok
        pos.append(p)
        slots.append(table[p // 64] * 64 + p % 64)
        seqs.append(SeqSpan(at, len(tok), start + len(tok), table))
        at += len(tok)
    return ForwardBatch(torch.tensor(ids), torch.cat(pos), torch.cat(slots), seqs, torch.arange(at), record_topk=record)


def _script(cfg, layout, topk: int):
    """Prefill A (40 tokens) and B (30 cached + 20 new: a chunk that starts after cached tokens), then decode
    both, batched, until B's context is ``topk``: every query sees at most ``topk`` tokens."""
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randint(100, 120000, (n,), generator=g).tolist() for n in (40 + topk, topk))
    ta, tb = torch.tensor([3, 0, 5]), torch.tensor([1, 4])
    steps = [[(a[:40], 0, ta)], [(b[:30], 0, tb)], [(b[30:50], 30, tb)]]
    steps += [[(a[40 + i:41 + i], 40 + i, ta), (b[50 + i:51 + i], 50 + i, tb)] for i in range(topk - 50)]
    return steps


def _run(model, cfg, layout, steps, fast: bool):
    for layer in model.model.layers:
        layer.self_attn.attention.short_context_fast_path = fast
    cache = KVCache(layout, cfg.num_hidden_layers, 6)
    logits, records = [], []
    for chunks in steps:
        rec: list = []
        logits.append(model(_batch(chunks, rec), cache))
        records.append([(layer, s.context_len, v) for layer, s, v in rec])
    return logits, records


@pytest.mark.parametrize("mode", ["exact", "fp8"])
@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_short_context_fast_path_is_bit_identical_to_the_indexer_path(backend, mode, monkeypatch):
    model, cfg, layout = _load(mode, backend)
    steps = _script(cfg, layout, cfg.index_topk)
    fast_logits, fast_rec = _run(model, cfg, layout, steps, fast=True)

    calls = []  # the indexer path really selects: count its top-k calls
    if backend == "torch":
        top = A.TorchAttention._top_positions
        monkeypatch.setattr(A.TorchAttention, "_top_positions",
                            staticmethod(lambda *a: calls.append(1) or top(*a)))
    else:
        top = K.topk_indices
        monkeypatch.setattr(K, "topk_indices", lambda *a, **kw: calls.append(1) or top(*a, **kw))
    slow_logits, slow_rec = _run(model, cfg, layout, steps, fast=False)
    assert len(calls) >= len(steps) * cfg.num_hidden_layers
    for f, s in zip(fast_logits, slow_logits):
        assert torch.equal(f, s), (f - s).abs().max()
    for f, s in zip(fast_rec, slow_rec):
        assert [(la, n) for la, n, _ in f] == [(la, n) for la, n, _ in s]
        assert all(torch.equal(vf, vs) for (_, _, vf), (_, _, vs) in zip(f, s))
    assert all(int(v[-1].sum()) == n for step in fast_rec for _, n, v in step)  # every visible token


@pytest.mark.parametrize("mode", ["exact", "fp8"])
def test_sparse_path_reads_only_the_selected_latent_rows(mode, monkeypatch):
    model, cfg, layout = _load(mode, "torch")
    topk = cfg.index_topk
    seq = torch.randint(100, 120000, (5 * topk + 1,), generator=torch.Generator().manual_seed(3)).tolist()
    table = torch.arange(6)
    cache = KVCache(layout, cfg.num_hidden_layers, 6)
    reads = []
    read = paged.read_latent
    monkeypatch.setattr(paged, "read_latent", lambda pool, slots, *a: reads.append(tuple(slots.shape)) or
                        read(pool, slots, *a))
    model(_batch([(seq[:-1], 0, table)]), cache)  # prefill: rows past top-k gather [rows, topk]
    assert reads and all(r[-1] <= topk for r in reads), reads
    reads.clear()
    model(_batch([(seq[-1:], len(seq) - 1, table)]), cache)  # decode at 5 x top-k
    assert reads == [(1, topk)] * cfg.num_hidden_layers


@pytest.mark.parametrize("mode", ["exact", "fp8"])
def test_paged_index_scores_equal_indexer_scores(mode):
    model, cfg, layout = _load(mode, "torch")
    att = model.model.layers[1].self_attn.attention
    g = torch.Generator().manual_seed(5)
    lens, tables = [150, 70, 200], [torch.tensor([4, 1, 7]), torch.tensor([0, 9]), torch.tensor([2, 3, 5, 8])]
    pool = KVCache(layout, 1, 10).index[0]
    for n, t in zip(lens, tables):
        pos = torch.arange(n)
        paged.store_index_key(pool, t[pos // 64] * 64 + pos % 64, torch.randn(n, layout.index_head_dim, generator=g),
                              layout)
    iq = torch.randn(3, cfg.index_n_heads, layout.index_head_dim, generator=g)
    if mode == "fp8":
        from dsv32_kernels import fp8
        iq = fp8.fake_quant(iq)
    iw = torch.randn(3, cfg.index_n_heads, generator=g)
    padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
    got = att._paged_index_scores(iq, iw, pool, padded, torch.tensor(lens), max(lens))
    for b, (n, t) in enumerate(zip(lens, tables)):
        keys = paged.read_index_keys(pool, t[torch.arange(n) // 64] * 64 + torch.arange(n) % 64, layout)
        want = att.indexer.scores(iq[b:b + 1], iw[b:b + 1], keys)[0]
        torch.testing.assert_close(got[b, :n], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert torch.isneginf(got[b, n:]).all()


def test_e4m3_as_half_is_exact_for_every_byte():
    b = torch.arange(256, dtype=torch.uint8)
    want = b.view(torch.float8_e4m3fn).float() * 2.0 ** -A.E4M3_AS_HALF_SHIFT
    got = A.e4m3_as_half(b).float()
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])


def test_top_positions_are_the_top_k_in_ascending_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 300, generator=g)
    last = torch.tensor([299, 299, 20, 5])
    scores.masked_fill_(torch.arange(300)[None, :] > last[:, None], float("-inf"))
    got = A.TorchAttention._top_positions(scores, 64, last)
    for r in range(4):
        want = set(scores[r].topk(min(64, int(last[r]) + 1)).indices.tolist())
        row = got[r][got[r] >= 0]
        assert set(row.tolist()) == want and torch.equal(row, row.sort().values)
        assert (got[r][len(row):] == -1).all()


def test_attention_only_bench_at_v32_shapes(tmp_path):
    """``bench engine --attention-only --shapes v32`` runs (a short context here) and reports the arithmetic ratio."""
    import argparse
    import json

    from dsv32_engine import bench_engine
    from dsv32_engine.checkpoint_maker import DEEPSEEK_V32

    p = argparse.ArgumentParser()
    bench_engine.add_arguments(p)
    out = tmp_path / "attn.json"
    args = p.parse_args(["--attention-only", "--shapes", "v32", "--contexts", "2", "--batches", "1,2",
                         "--repeats", "1", "--json", str(out)])
    assert bench_engine.run(args) == 0
    rows = json.loads(out.read_text())["attention"]
    assert [(r["context"], r["batch"]) for r in rows] == [(4096, 1), (4096, 2)]
    assert all(r["dsa_s"] > 0 and r["dense_s"] > 0 for r in rows)
    cfg = ModelConfig.from_dict(dict(DEEPSEEK_V32))  # 16k and 64k: 5.43x and 11.05x
    assert [round(bench_engine.attention_macs(cfg, n, n) / bench_engine.attention_macs(cfg, n, 2048), 2)
            for n in (16384, 65536)] == [5.43, 11.05]
