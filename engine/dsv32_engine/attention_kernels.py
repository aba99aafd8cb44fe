"""The kernel path of one MLA layer: cache store, indexer selection and sparse attention through ``dsv32_kernels``.

``MLA.forward`` hands over here when ``mla.kernel_path`` is set (``EngineCore(...,
attention_backend="kernels")``). The projections are the model's own; what
changes is the attention itself:

1. ``store_kv`` writes the step's latent ``[c ‖ k_pe]`` and indexer keys into the
   paged pools (the same bytes as ``paged.store_latent`` / ``store_index_key``);
   ``batch.on_layer_done`` fires right after it, as on the torch path;
2. selection: with an indexer and a context longer than ``index_topk``,
   ``indexer_logits_decode`` (paged keys) or ``indexer_logits_prefill`` (the
   sequence's keys gathered into one ragged block, ``ke = position + 1``) then
   ``topk_indices`` give each query its physical slots (``-1`` padded); otherwise
   (short context, or a ``deepseek_v3`` model without indexer) the indices are
   every causal position;
3. attention in the absorbed MQA form for decode *and* prefill (spec §3.1):
   ``q = [q_nope·W_UK ‖ q_pe]`` (576 for V3.2) against the cached 576 values of
   the selected slots (``sparse_mla_decode`` / ``sparse_mla_prefill``), then
   ``o = o_lat·W_UVᵀ`` per head and ``o_proj``.

Numerics against the torch path (``MLA._decode`` / ``MLA._prefill``): the same
cache bytes and the same selection rule; the indexer's ``head_dim^-0.5`` is
folded into the head weights (``Σ_h ReLU(q_h·k)·(w_h·d^-0.5)``, equal up to
rounding since the factor is positive), and in fp8 mode the kernel gets
``q`` as e4m3 + pow2 scale: re-quantising the model's FP8-rounded query gives
back exactly the same values. Prefill runs absorbed here and expanded (MHA) on
the torch path: the same sums in another order. On CPU the ops run their torch
twins; on CUDA the Triton kernels (``dsv32_kernels`` dispatch).
"""

from __future__ import annotations

import torch

from dsv32_kernels import fp8
from .rope import rope_interleaved

ATTENTION_BACKENDS = ("torch", "kernels")
_ROWS_X_CONTEXT = 1 << 24  # bound on the [query rows, context] logits / index tensors of one prefill chunk


def resolve_backend(name: str | None, device: torch.device) -> str:
    """``None`` → ``kernels`` on CUDA, ``torch`` elsewhere; anything else must be one of ``ATTENTION_BACKENDS``."""
    if name is None:
        return "kernels" if torch.device(device).type == "cuda" else "torch"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return name


def set_attention_backend(model: torch.nn.Module, name: str) -> None:
    """Route every MLA layer of ``model`` through the kernels (``kernels``) or the torch path (``torch``)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "kernels":
        import dsv32_kernels  # noqa: F401  (fail here, not in the first forward, if it is missing)
    for m in model.modules():
        if hasattr(m, "kernel_path"):
            m.kernel_path = name == "kernels"


def _index_query(iq: torch.Tensor, fp8_mode: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The indexer query as the kernels take it: e4m3 + per-head scale (fp8), or as is (exact).

    In fp8 mode ``iq`` is already Hadamard-rotated and FP8-rounded (``Indexer.project``);
    quantising it again reproduces the same products ``q8·s`` exactly (pow2 scales).
    """
    if not fp8_mode:
        return iq, None
    q, s = fp8.quant_blocks(iq)
    return q, s.squeeze(-1)


def _all_positions(tables: torch.Tensor, lens: torch.Tensor, width: int, page: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position ``< lens[b]``: (logical, physical) ``[B, width]`` int32, ``-1`` padded."""
    pos = torch.arange(width, device=tables.device)
    ok = pos[None, :] < lens[:, None]
    pages = tables.long().gather(1, (pos // page).clamp_max(tables.shape[1] - 1).expand(tables.shape[0], -1))
    physical = torch.where(ok, pages * page + pos % page, -1)
    logical = torch.where(ok, pos[None, :], -1)
    return logical.to(torch.int32), physical.to(torch.int32)


def _record(batch, layer: int, seq, logical: torch.Tensor) -> None:
    """``batch.record_topk`` entry as the torch path writes it: ``[rows, context_len]`` bool of attended positions."""
    vis = torch.zeros(logical.shape[0], seq.context_len + 1, dtype=torch.bool, device=logical.device)
    vis.scatter_(1, torch.where(logical >= 0, logical.long(), seq.context_len), True)
    batch.record_topk.append((layer, seq, vis[:, : seq.context_len]))


def forward(mla, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch, cache) -> torch.Tensor:
    """``MLA.forward`` through the ``dsv32_kernels`` ops (same arguments, same result up to rounding)."""
    import dsv32_kernels as K

    T, H, dev = x.shape[0], mla.n_heads, x.device
    layout, layer = mla.layout, mla.layer
    nope, rank, page = mla.nope, mla.rank, layout.page_size
    fp8_mode = layout.mode == "fp8"
    qr = mla.q_a_layernorm(mla.q_a_proj(x))
    q = mla.q_b_proj(qr).view(T, H, nope + mla.rope)
    q_nope, q_pe = q[..., :nope], rope_interleaved(q[..., nope:], cos, sin)
    kv = mla.kv_a_proj_with_mqa(x)
    c = mla.kv_a_layernorm(kv[:, :rank])
    k_pe = rope_interleaved(kv[:, rank:], cos, sin)
    latent_pool = cache.latent[layer]
    index_pool = ik = None
    if mla.indexer is not None:
        iq, iw, ik = mla.indexer.project(x, qr, cos, sin, fp8_mode)
        iq8, iq_scale = _index_query(iq, fp8_mode)
        iw = iw * mla.indexer.head_dim ** -0.5  # Indexer.scores applies it inside the ReLU
        index_pool = cache.index[layer]
    K.store_kv(latent_pool, index_pool, c, k_pe, ik, batch.slot_mapping, layout)
    if batch.on_layer_done is not None:
        batch.on_layer_done(layer)

    # absorbed query [T, H, kv_lora_rank + rope]; the output is mapped back through W_UV
    w = mla.kv_b_proj.weight.view(H, nope + mla.v_dim, rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    q_abs = torch.cat([torch.einsum("thd,hdc->thc", q_nope, w_uk), q_pe], dim=-1)
    topk = mla.cfg.index_topk
    out = torch.empty(T, H, mla.v_dim, dtype=x.dtype, device=dev)

    decode = [s for s in batch.seqs if s.num_new == 1]
    if decode:
        rows = torch.tensor([s.start for s in decode], device=dev)
        tables = torch.nn.utils.rnn.pad_sequence([s.block_table for s in decode], batch_first=True,
                                                 padding_value=-1).to(torch.int32)
        lens = torch.tensor([s.context_len for s in decode], dtype=torch.int32, device=dev)
        lmax = max(s.context_len for s in decode)
        if index_pool is not None and lmax > topk:
            logits = K.indexer_logits_decode(iq8[rows, None], iw[rows, None], index_pool, tables, lens, layout,
                                             None if iq_scale is None else iq_scale[rows, None], max_ctx=lmax)
            logical, physical = K.topk_indices(logits, topk, tables, page_size=page)  # [B, 1, topk]
            logical, physical = logical[:, 0], physical[:, 0]
        else:
            logical, physical = _all_positions(tables, lens, lmax, page)
        o_lat, _ = K.sparse_mla_decode(q_abs[rows], latent_pool, physical, mla.scale, layout)
        out[rows] = torch.einsum("bhc,hdc->bhd", o_lat.to(x.dtype), w_uv)
        if batch.record_topk is not None:
            for b, s in enumerate(decode):
                _record(batch, layer, s, logical[b:b + 1])

    for s in batch.seqs:
        if s.num_new == 1:
            continue
        n, L = s.num_new, s.context_len
        table = s.block_table[None].to(torch.int32)
        pos_ctx = torch.arange(L, device=dev)
        slots = s.block_table[pos_ctx // page] * page + pos_ctx % page
        use_index = index_pool is not None and L > topk
        if use_index:  # this sequence's keys as one ragged block (DeepGEMM fp8_mqa_logits form)
            if fp8_mode:
                keys, scales = fp8.index_page_views(index_pool, layout)
                k_ctx, k_scale = keys[slots // page, slots % page], scales[slots // page, slots % page]
            else:
                k_ctx, k_scale = index_pool[slots // page, slots % page], None
        step = max(1, _ROWS_X_CONTEXT // L)
        vis_rows = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            rows = slice(s.start + r0, s.start + r1)
            q_pos = torch.arange(L - n + r0, L - n + r1, device=dev)
            if use_index:
                ks = torch.zeros(r1 - r0, dtype=torch.int32, device=dev)
                ke = (q_pos + 1).to(torch.int32)
                logits = K.indexer_logits_prefill(iq8[rows], iw[rows], k_ctx, k_scale, ks, ke,
                                                  None if iq_scale is None else iq_scale[rows])
                logical, physical = K.topk_indices(logits, topk, table, page_size=page)  # [rows, topk]
            else:
                ok = pos_ctx[None, :] <= q_pos[:, None]
                logical = torch.where(ok, pos_ctx[None, :], -1).to(torch.int32)
                physical = torch.where(ok, slots[None, :], -1).to(torch.int32)
            o_lat, _ = K.sparse_mla_prefill(q_abs[rows], latent_pool, physical, mla.scale, layout)
            out[rows] = torch.einsum("thc,hdc->thd", o_lat.to(x.dtype), w_uv)
            if batch.record_topk is not None:
                vis_rows.append(logical)
        if batch.record_topk is not None:
            _record(batch, layer, s, torch.cat(vis_rows))
    return mla.o_proj(out.view(T, H * mla.v_dim))
