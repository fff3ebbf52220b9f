"""Routing: region means in Triton, then the R x R logits and the top-k selection in torch.

Design (argued, since it cannot be measured on the CPU interpreter):

* Pooling is the only part that touches every token (it reads all of q and k once, ``2 * N * H * D``
  elements), so it is the part worth a kernel: ``_pool_kernel`` reads q and k in place (any strides,
  non-contiguous 2-D/3-D regions, non-divisible extents) and writes fp32 means, one program per
  (region, head, batch). A torch version would need a gather or a padded copy per region shape.
* The logits are a batched ``(R, H*D) @ (H*D, R)`` product (R = 49..1024 in practice): cuBLAS in fp32 is
  as fast as anything we could write, and an extra launch costs microseconds.
* Selection uses a stable descending sort of each logit row, keeping the first ``topk``: unlike
  ``torch.topk`` its tie order is defined (lower region index first), and the rows are short
  (R entries), so the sort costs about what topk does at these sizes.

Everything is asynchronous and of static shape (no host sync), so route is CUDA-graph safe too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import geometry, grid_strides, head_block, region_box, region_token, token_offset


@triton.jit
def _pool_kernel(
    Q, K, QR, KR,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    H, L0, L1, L2, S0, S1, S2, D,
    MP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    R = S0 * S1 * S2
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    acc_q = tl.zeros([BLOCK_D], tl.float32)
    acc_k = tl.zeros([BLOCK_D], tl.float32)
    rr = tl.full([BLOCK_T], 0, tl.int32) + r
    for t0 in tl.static_range(0, MP, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        x0, x1, x2, valid = region_token(rr, t, L0, L1, L2, S0, S1, S2)
        mask = valid[:, None] & (offs_d < D)[None, :]
        q = tl.load((q_base + token_offset(x0, x1, x2, sq_0, sq_1, sq_2))[:, None] + offs_d[None, :],
                    mask=mask, other=0.0)
        k = tl.load((k_base + token_offset(x0, x1, x2, sk_0, sk_1, sk_2))[:, None] + offs_d[None, :],
                    mask=mask, other=0.0)
        acc_q += tl.sum(q.to(tl.float32), 0)
        acc_k += tl.sum(k.to(tl.float32), 0)
    a0, a1, a2, n0, n1, n2 = region_box(r, L0, L1, L2, S0, S1, S2)
    count = (n0 * n1 * n2).to(tl.float32)
    out = ((b * R + r) * H + h) * D + offs_d  # (B, R, H, D) contiguous
    tl.store(QR + out, acc_q / count, mask=offs_d < D)
    tl.store(KR + out, acc_k / count, mask=offs_d < D)


def region_means(q: torch.Tensor, k: torch.Tensor, num_regions):
    """fp32 region means of q and k, each ``(B, R, H, D)`` contiguous."""
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    nsp = q.dim() - 3
    geo = geometry(q.shape, num_regions)
    qr = torch.empty((B, geo.R, H, D), dtype=torch.float32, device=q.device)
    kr = torch.empty_like(qr)
    block_d = head_block(D)
    # ~4K elements per load keeps registers low at D = 256 and loops at most MP / BLOCK_T times
    block_t = max(1, min(geo.MP, 4096 // block_d))
    _pool_kernel[(geo.R, H, B)](
        q, k, qr, kr,
        *grid_strides(q, nsp), *grid_strides(k, nsp),
        H, *geo.L, *geo.S, D,
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
