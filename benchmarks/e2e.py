"""End-to-end rows: one training step (forward, backward, optimizer step) of timm's ResNet-50 and
Swin-B, bf16 autocast, batch 64 at 224x224, with the backbone frozen.

Variants, each on a freshly built model (``timm.create_model(..., pretrained=False)``):
- ``full-ft``: no adapter, every parameter trains (full fine-tuning);
- ``mslora-eager`` / ``mslora-triton`` / ``mslora-cuda``: ``mslora_kernels.inject(model,
  MSLoRAConfig(backend=...))``, adapters and the classifier head train;
- ``lora-peft``: standard LoRA from PEFT (r=8, alpha=16) on the same model's convolutions (ResNet)
  or attention and MLP linears (Swin), adapters and the classifier head train; frozen BatchNorm
  in eval mode, as ``inject`` leaves it for the MSLoRA variants.
A variant that cannot run here (no timm, no PEFT, inject not importable, a backend not built)
records why instead of a number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import measure

MODELS = {
    "resnet50": "resnet50",
    "swin_b": "swin_base_patch4_window7_224",
}
VARIANTS = ("full-ft", "mslora-eager", "mslora-triton", "mslora-cuda", "lora-peft")
PEFT_TARGETS = {  # regexes over full module names (PEFT's target_modules as a string)
    "resnet50": r"layer\d\.\d+\.conv[123]",
    "swin_b": r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
}
IMAGE_SIZE = 224
NUM_CLASSES = 1000


class Unavailable(Exception):
    """A variant that cannot run on this machine; the message says why."""


def _unfreeze_head(model) -> None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        raise Unavailable(f"{type(model).__name__} has no get_classifier() to train as the head")
    for p in head.parameters():
        p.requires_grad_(True)


def build_model(model_key: str, variant: str, device: torch.device):
    """(model, detail) for one variant; raises Unavailable with the reason."""
    try:
        import timm
    except Exception as e:
        raise Unavailable(f"timm is not importable ({type(e).__name__}: {e})") from e
    model = timm.create_model(MODELS[model_key], pretrained=False, num_classes=NUM_CLASSES)
    if variant == "full-ft":
        return model.to(device), "all parameters train"
    if variant.startswith("mslora-"):
        backend = variant.split("-", 1)[1]
        backend = "reference" if backend == "eager" else backend
        try:
            from mslora_kernels import MSLoRAConfig, inject
        except ImportError as e:
            raise Unavailable(f"mslora_kernels.inject/MSLoRAConfig not importable ({e})") from e
        if backend != "reference":
            from mslora_kernels.backends import fused_unavailable_reason

            reason = fused_unavailable_reason(backend, device)
            if reason:
                raise Unavailable(reason)
        inject(model, MSLoRAConfig(backend=backend))
        _unfreeze_head(model)
        return model.to(device), f'inject(model, MSLoRAConfig(backend="{backend}")) + head'
    if variant == "lora-peft":
        try:
            import peft
        except Exception as e:
            raise Unavailable(f"PEFT is not importable ({type(e).__name__}: {e})") from e
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS[model_key])
        model = peft.get_peft_model(model, cfg)
        _unfreeze_head(model.get_base_model())
        # Frozen BatchNorm pinned to eval mode, as inject does for the MSLoRA variants: the same
        # frozen backbone (no batch statistics, no running-stat updates) for every adapter.
        from mslora_kernels.inject import freeze

        freeze(model, keep={n for n, p in model.named_parameters() if p.requires_grad})
        return model.to(device), (f"PEFT {peft.__version__} LoRA r=8 alpha=16 on "
                                  f"{PEFT_TARGETS[model_key]} + head; "
                                  "frozen BatchNorm in eval mode")
    raise ValueError(f"unknown end-to-end variant {variant!r}; expected one of {VARIANTS}")


def time_train_step(model, batch: int, device: torch.device, image_size: int = IMAGE_SIZE,
                    num_classes: int = NUM_CLASSES, warmup: int = 3, steps: int = 10,
                    autocast_dtype=torch.bfloat16) -> dict:
    """Median/p20/p80 of one training step, its peak memory, trainable parameters.

    The step: zero the gradients, forward under autocast, cross-entropy, backward, AdamW step
    over the trainable parameters. Each step is timed alone (CUDA events on a GPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):  # also creates the optimizer state
        step()
    times = []
    for _ in range(steps):
        times.append(_time_once(step, device))
    # Gradients to None first: the step's own gradients count in its peak (left alive from the
    # step before, they would sit in the baseline, hiding full fine-tuning's largest buffer).
    peak, note = measure.peak_memory_mb(step, device, reset=params)
    med, p20, p80 = measure._quantiles(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak,
            "peak_mem_note": note or "one step beyond the model, optimizer state and batch",
            "trainable_params": sum(p.numel() for p in params)}


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
