"""Routing: region means in Triton, then the R x R logits and the top-k selection in torch.

Design (argued, since it cannot be measured on the CPU interpreter):

* Pooling is the only part that touches every token (it reads all of q and k once, ``2 * N * H * D``
  elements), so it is the part worth a kernel: ``_pool_kernel`` reads q and k in place through the slot
  table (views of a fused qkv, non-contiguous 2-D/3-D regions, non-divisible extents) and writes fp32
  means, one program per (region, head, batch). A torch version would need a gather or a padded copy.
* The logits are a batched ``(R, H*D) @ (H*D, R)`` product (R = 49..1024 in practice): cuBLAS in fp32 is
  as fast as anything we could write, and an extra launch costs microseconds. It follows torch's fp32
  matmul setting (TF32 only if the user enabled it), exactly as the reference's routing does.
* Selection uses a stable descending sort of each logit row, keeping the first ``topk``: unlike
  ``torch.topk`` its tie order is defined (lower region index first), and the rows are short
  (R entries), so the sort costs about what topk does at these sizes.

Everything is asynchronous and of static shape (no host sync), so route is CUDA-graph safe too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import collapse, geometry, head_block, slot_table, token_strides


@triton.jit
def _pool_kernel(
    Q, K, TAB, QR, KR,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
    H, R, D,
    MP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    acc_q = tl.zeros([BLOCK_D], tl.float32)
    acc_k = tl.zeros([BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, MP, BLOCK_T):
        tok = tl.load(TAB + r * MP + t0 + tl.arange(0, BLOCK_T))
        valid = tok >= 0
        tok = tok.to(tl.int64)
        mask = valid[:, None] & (offs_d < D)[None, :]
        q = tl.load((q_base + tok * sq_t)[:, None] + offs_d[None, :], mask=mask, other=0.0)
        k = tl.load((k_base + tok * sk_t)[:, None] + offs_d[None, :], mask=mask, other=0.0)
        acc_q += tl.sum(q.to(tl.float32), 0)
        acc_k += tl.sum(k.to(tl.float32), 0)
        count += valid.to(tl.float32)
    n = tl.sum(count, 0)
    out = ((b * R + r) * H + h) * D + offs_d  # (B, R, H, D) contiguous
    tl.store(QR + out, acc_q / n, mask=offs_d < D)
    tl.store(KR + out, acc_k / n, mask=offs_d < D)


def region_means(q: torch.Tensor, k: torch.Tensor, num_regions):
    """fp32 region means of q and k, each ``(B, R, H, D)`` contiguous."""
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    nsp = q.dim() - 3
    geo = geometry(q.shape, num_regions)
    q, k = collapse(q, nsp), collapse(k, nsp)
    qr = torch.empty((B, geo.R, H, D), dtype=torch.float32, device=q.device)
    kr = torch.empty_like(qr)
    block_d = head_block(D)
    # ~4K elements per load keeps registers low at D = 256 and loops at most MP / BLOCK_T times
    block_t = max(1, min(geo.MP, 4096 // block_d))
    _pool_kernel[(geo.R, H, B)](
        q, k, slot_table(geo, q.device), qr, kr,
        *token_strides(q, nsp), *token_strides(k, nsp),
        H, geo.R, D,
        MP=geo.MP, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4,
    )
    return qr, kr


def route(q, k, num_regions, topk: int, per_head: bool, scale: float) -> torch.Tensor:
    """idx int64 ``(B, R, topk)`` (shared) or ``(B, H, R, topk)`` (per head), rows by descending logit."""
    qr, kr = region_means(q, k, num_regions)
    B, R, H, D = qr.shape
    if per_head:
        qr, kr = qr.transpose(1, 2), kr.transpose(1, 2)  # (B, H, R, D)
    else:
        qr, kr = qr.reshape(B, R, H * D), kr.reshape(B, R, H * D)
    logits = (qr * scale) @ kr.transpose(-1, -2)  # the reference's order of operations
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    return order[..., :topk].contiguous()
