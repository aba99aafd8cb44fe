"""topk_indices: the indexer's top-k, as logical positions and physical cache slots (spec §6.4).

Selection is ``torch.topk`` on both paths (identical results, ties included): a
partial selection, never a sort of the whole row. ``by_position=True`` then orders
the ``k`` winners by column (invisible picks last), so that attention reads the
cache in order and a row that fits in ``k`` gives exactly ``0, 1, ...``. The
kernel fuses what follows: ``-inf`` (invisible) picks become ``-1``, column
offsets turn ragged prefill columns into request positions, and
``slot = block_table[req][j // 64] * 64 + j % 64`` with ``-1`` preserved (vLLM
``triton_convert_req_index_to_global_index``). A radix-select top-k kernel for
128k contexts is not written yet.
"""

from __future__ import annotations

import torch

from ._triton import next_pow2, tl, triton
from .dispatch import use_triton
from .checks import expect


@triton.jit
def _topk_indices_kernel(
    val_ptr, idx_ptr, req_ptr, off_ptr, bt_ptr, log_ptr, phys_ptr, K, k_sel, n_per_req,
    bt_sr, bt_sp, max_pages,
    HAS_REQ: tl.constexpr, HAS_OFF: tl.constexpr, HAS_BT: tl.constexpr, PAGE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    sel = c < k_sel
    v = tl.load(val_ptr + row * k_sel + c, mask=sel, other=float("-inf"))
    j = tl.load(idx_ptr + row * k_sel + c, mask=sel, other=0)
    if HAS_OFF:
        j = j - tl.load(off_ptr + row)
    keep = v > float("-inf")
    logical = tl.where(keep, j, -1)
    tl.store(log_ptr + row * K + c, logical.to(tl.int32), mask=c < K)
    if HAS_BT:
        if HAS_REQ:
            req = tl.load(req_ptr + row).to(tl.int64)
        else:
            req = row // n_per_req
        p = tl.where(keep, logical // PAGE, 0)
        pg = tl.load(bt_ptr + req * bt_sr + p * bt_sp, mask=keep & (p < max_pages), other=-1)
        phys = tl.where(keep & (pg >= 0), pg.to(tl.int64) * PAGE + logical % PAGE, -1)
        tl.store(phys_ptr + row * K + c, phys.to(tl.int32), mask=c < K)


def _select(logits: torch.Tensor, k: int, by_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.reshape(-1, logits.shape[-1])
    vals, idx = rows.topk(min(k, rows.shape[-1]), dim=-1)
    if by_position:  # sort only the k winners: visible ones by column, -inf picks after them
        order = torch.where(vals > float("-inf"), idx, rows.shape[-1]).argsort(dim=-1)
        vals, idx = vals.gather(1, order), idx.gather(1, order)
    return vals.contiguous(), idx.contiguous()


def _check(logits, k, block_tables, row_req, col_offset):
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    expect(logits, "logits", (None,) * logits.dim(), dtypes=(torch.float32,))
    R = logits.numel() // max(1, logits.shape[-1])
    if row_req is not None:
        expect(row_req, "row_req", (R,), dtypes=(torch.int32, torch.int64))
    if col_offset is not None:
        expect(col_offset, "col_offset", (R,), dtypes=(torch.int32, torch.int64))
    if block_tables is not None:
        expect(block_tables, "block_tables", (None, None), dtypes=(torch.int32, torch.int64))
        if row_req is None and R % block_tables.shape[0]:
            raise ValueError(f"{R} logit rows do not split evenly over {block_tables.shape[0]} block-table rows; "
                             "pass row_req")


def topk_indices(logits: torch.Tensor, k: int, block_tables: torch.Tensor | None = None, *,
                 row_req: torch.Tensor | None = None, col_offset: torch.Tensor | None = None,
                 page_size: int = 64, by_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` visible positions of ``logits [..., L]`` → ``(logical, physical)``, both ``[..., k]`` int32.

    Rows with fewer than ``k`` finite logits are padded with ``-1`` (order: best
    first, or ascending column with ``by_position``). ``logical = column - col_offset[row]``
    (prefill: ``col_offset = ks``).
    Row ``r`` maps to block-table row ``row_req[r]``, by default ``r // (R / B)``
    (decode ``[B, n, L]`` logits → request ``b``). Without ``block_tables``,
    ``physical`` is ``logical`` (an unpaged sequence).
    """
    _check(logits, k, block_tables, row_req, col_offset)
    if not use_triton(logits.device):
        return naive_topk_indices(logits, k, block_tables, row_req=row_req, col_offset=col_offset,
                                  page_size=page_size, by_position=by_position)
    lead = logits.shape[:-1]
    vals, idx = _select(logits, k, by_position)
    R, k_sel = vals.shape
    logical = torch.empty(*lead, k, dtype=torch.int32, device=logits.device)
    physical = torch.empty_like(logical) if block_tables is not None else logical
    if R == 0:
        return logical, physical
    n_per_req = R // block_tables.shape[0] if block_tables is not None and block_tables.shape[0] else 1
    dummy = idx
    row_req = row_req.contiguous() if row_req is not None else None  # read with unit stride
    col_offset = col_offset.contiguous() if col_offset is not None else None
    bt = block_tables if block_tables is not None else dummy.view(1, -1)
    block_k = min(1024, next_pow2(k))
    _topk_indices_kernel[(R, triton.cdiv(k, block_k))](
        vals, idx, row_req if row_req is not None else dummy, col_offset if col_offset is not None else dummy,
        bt, logical, physical, k, k_sel, n_per_req, bt.stride(0), bt.stride(1), bt.shape[1],
        HAS_REQ=row_req is not None, HAS_OFF=col_offset is not None, HAS_BT=block_tables is not None,
        PAGE=page_size, BLOCK_K=block_k, num_warps=4,
    )
    return logical, physical


def naive_topk_indices(logits: torch.Tensor, k: int, block_tables: torch.Tensor | None = None, *,
                       row_req: torch.Tensor | None = None, col_offset: torch.Tensor | None = None,
                       page_size: int = 64, by_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`topk_indices`."""
    lead = logits.shape[:-1]
    vals, idx = _select(logits, k, by_position)
    R, k_sel = vals.shape
    j = idx if col_offset is None else idx - col_offset.long()[:, None]
    logical = torch.where(vals > float("-inf"), j, -1)
    logical = torch.nn.functional.pad(logical, (0, k - k_sel), value=-1)
    if block_tables is None:
        out = logical.to(torch.int32).reshape(*lead, k)
        return out, out
    if row_req is None:
        req = torch.arange(R, device=logits.device) // max(1, R // max(1, block_tables.shape[0]))
    else:
        req = row_req.long()
    keep = logical >= 0
    p = torch.where(keep, logical // page_size, 0).clamp_max(block_tables.shape[1] - 1)
    pg = block_tables.long()[req[:, None], p]
    keep &= (pg >= 0) & (logical // page_size < block_tables.shape[1])
    physical = torch.where(keep, pg * page_size + logical % page_size, -1)
    return logical.to(torch.int32).reshape(*lead, k), physical.to(torch.int32).reshape(*lead, k)
