"""Small MSLoRA CUDA-backend cases for compute-sanitizer (run by scripts/cuda_sanitize.sh):
forward and backward through the launchers, every option set, both physical layouts, fp32 and
bf16, shapes that leave partial tiles and partial channel chunks."""

import torch

from mslora_kernels.config import MSLoRAOptions
from mslora_kernels.cuda.mslora import mslora_bwd, mslora_fwd

CASES = [({}, "channels_first"), ({"prenorm": True, "enhance": True, "pool": True, "gate": True,
                                   "shuffle": True}, "channels_last")]
torch.manual_seed(0)
for opts, fmt in CASES:
    for dtype in (torch.float32, torch.bfloat16):
        o = MSLoRAOptions(12, 36, 3, (3, 5), data_format=fmt, **opts)
        from mslora_kernels import MSLoRA

        m = MSLoRA(12, 36, 3, (3, 5), data_format=fmt, **opts).cuda()
        w = {k: v.detach().to(dtype) for k, v in m.named_parameters()}
        shape = (2, 12, 9, 11) if fmt == "channels_first" else (2, 9, 11, 12)
        x = torch.randn(shape, device="cuda", dtype=dtype)
        out, zmean = mslora_fwd(x, w, o)
        dx, grads = mslora_bwd(torch.randn_like(out), x, w, o, zmean)
        torch.cuda.synchronize()
        print(f"ok {fmt} {dtype} {sorted(opts)}")
