"""``@triton.jit`` helpers shared by several kernel modules.

Kept apart from ``_common`` (imported by the op layer at package import): a jit function is
interpreted or compiled according to TRITON_INTERPRET when it is decorated, so jit code loads only
with the kernel modules, on first use.
"""

import triton
import triton.language as tl


@triton.jit
def ln_c_stats(x_base, pix_off, pmask, C, sxc, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-pixel mean and 1/std over C of x (two-pass in fp32, biased variance, eps 1e-6).

    ``x_base + pix_off[p] + c * sxc`` addresses x[p, c]; pixels with ``pmask`` false read 0.
    Returns two fp32 [BLOCK_P] vectors.
    """
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        c = k0 + kk
        msk = pmask[:, None] & (c < C)[None, :]
        xv = tl.load(x_base + pix_off[:, None] + c[None, :] * sxc, mask=msk, other=0.0)
        acc += tl.sum(xv.to(tl.float32), axis=1)
    mean = acc / C
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        c = k0 + kk
        msk = pmask[:, None] & (c < C)[None, :]
        xv = tl.load(x_base + pix_off[:, None] + c[None, :] * sxc, mask=msk, other=0.0)
        dv = tl.where(msk, xv.to(tl.float32) - mean[:, None], 0.0)
        acc2 += tl.sum(dv * dv, axis=1)
    rstd = 1.0 / tl.sqrt(acc2 / C + 1e-6)
    return mean, rstd
