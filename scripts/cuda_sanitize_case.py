"""Small MSLoRA CUDA-backend cases for compute-sanitizer (run by scripts/cuda_sanitize.sh):
forward and backward through the launchers, every option set, both physical layouts, fp32 and
bf16, shapes that leave partial tiles and partial channel chunks, and one whose tensor-core
products take several K chunks and column chunks (C/G = 75, D = 40; as in tests/test_cuda_host.py's
TC_SHAPES)."""

import torch

from mslora_kernels import MSLoRA
from mslora_kernels.cuda.mslora import mslora_bwd, mslora_fwd

ALL = {"prenorm": True, "enhance": True, "pool": True, "gate": True, "shuffle": True}
# (channels, rank, groups, kernel sizes, options, data_format, dtypes)
CASES = [
    (12, 36, 3, (3, 5), {}, "channels_first", (torch.float32, torch.bfloat16)),
    (12, 36, 3, (3, 5), ALL, "channels_last", (torch.float32, torch.bfloat16)),
    (150, 40, 2, (3, 5, 7), ALL, "channels_first", (torch.bfloat16,)),
]
torch.manual_seed(0)
for c, d, g, ks, opts, fmt, dtypes in CASES:
    m = MSLoRA(c, d, g, ks, data_format=fmt, **opts).cuda()
    o = m.options
    for dtype in dtypes:
        w = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
        shape = (2, c, 9, 11) if fmt == "channels_first" else (2, 9, 11, c)
        x = torch.randn(shape, device="cuda", dtype=dtype)
        out, zmean = mslora_fwd(x, w, o)
        dx, grads = mslora_bwd(torch.randn_like(out), x, w, o, zmean)
        torch.cuda.synchronize()
        print(f"ok C={c} D={d} G={g} {fmt} {dtype} {sorted(opts)}")
