"""Training an injected model: fused vs reference, frozen weights, DDP, checkpointing, AMP, compile.

Each test builds a small injected model (mslora_kernels.models mirrors timm / torchvision) with
non-zero `up` weights, runs real optimizer steps or backward passes, and compares against a plain
single-process, float32, eager run.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mslora_kernels import MSLoRA, MSLoRAConfig, available_backends, inject
from mslora_kernels.models import ResNet, SwinTransformer
from mslora_kernels.testing import rel_error

CFG = dict(rank=24, groups=4)


def make_model(kind="resnet", backend="reference", seed=0, **cfg):
    torch.manual_seed(seed)
    if kind == "resnet":
        model = ResNet(layers=(1, 1, 1), widths=(8, 16, 32), in_chans=3, num_classes=5)
        shape = (6, 3, 9, 7)
    else:
        model = SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(1, 1),
                                num_classes=5)
        shape = (6, 3, 16, 16)
    with torch.no_grad():  # non-trivial BN statistics, so that frozen vs batch stats differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    inject(model, MSLoRAConfig(**CFG, backend=backend, trainable=["fc", "head"], **cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MSLoRA):
                m.up.weight.normal_(0, 0.1)
    model.train()
    return model, shape


def batch(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, 5, (shape[0],), generator=g)


def train_steps(model, x, y, steps=3, opt="adamw"):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt == "adamw":
        optim = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    else:
        optim = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        optim.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _fused_gpu_backends() -> list[str]:
    """The fused backends usable on this GPU (skips the test when there is none)."""
    fused = [b for b in available_backends("cuda") if b != "reference"]
    if not fused:
        pytest.skip("no fused MSLoRA backend available on this GPU")
    return fused


def _need_triton_cpu():
    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton MSLoRA backend is not available on the CPU in this checkout "
                    "(available_backends('cpu') lacks 'triton': its kernels have not landed here)")


# --------------------------------------------------------------------------------------------------
# Frozen backbone under real optimizer steps
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_frozen_weights_bit_identical_after_steps(kind, opt):
    model, shape = make_model(kind)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained
    x, y = batch(shape)
    losses = train_steps(model, x, y, steps=4, opt=opt)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    changed = [n for n, p in model.named_parameters()
               if n in trained and not torch.equal(p, trained[n])]
    assert len(changed) == len(trained)
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------------
# Fused backend vs reference: a few optimizer steps give the same weights
# --------------------------------------------------------------------------------------------------
def _fused_vs_reference(device, backend, kind):
    ref, shape = make_model(kind, backend="reference")
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if isinstance(m, MSLoRA):
            m.backend = backend
    ref.to(device)
    fused.to(device)
    x, y = batch(shape)
    x, y = x.to(device), y.to(device)
    l_ref = train_steps(ref, x, y, steps=3)
    l_fused = train_steps(fused, x, y, steps=3)
    torch.testing.assert_close(torch.tensor(l_fused), torch.tensor(l_ref), rtol=1e-4, atol=1e-5)
    pf = dict(fused.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert rel_error(pf[n], p) < 1e-4, n
        else:
            assert torch.equal(pf[n], p), n


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_training_fused_triton_vs_reference_cpu(kind):
    _need_triton_cpu()
    _fused_vs_reference(torch.device("cpu"), "triton", kind)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_training_fused_vs_reference_gpu(kind, no_tf32):
    for backend in _fused_gpu_backends():
        _fused_vs_reference(torch.device("cuda"), backend, kind)


# --------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------
def _checkpointing_same_grads(backend, device):
    model, shape = make_model("resnet", backend=backend)
    model.to(device)
    x, y = batch(shape)
    x, y = x.to(device), y.to(device)
    F.cross_entropy(model(x), y).backward()
    want = grads(model)

    model.zero_grad(set_to_none=True)

    def forward_ckpt(m, x):
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for i in range(m.num_stages):
            x = checkpoint(getattr(m, f"layer{i + 1}"), x, use_reentrant=False)
        return m.fc(torch.flatten(m.avgpool(x), 1))

    F.cross_entropy(forward_ckpt(model, x), y).backward()
    got = grads(model)
    for n in want:
        if device == "cpu":
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
        else:  # the GPU's weight-gradient atomics sum in any order: as close as that allows
            assert rel_error(got[n], want[n]) < 1e-5, (backend, n)


@pytest.mark.parametrize("backend", ["reference", pytest.param(
    "triton", marks=[pytest.mark.interpreter, pytest.mark.slow])])
def test_activation_checkpointing_same_grads(backend):
    """Non-reentrant checkpointing recomputes the adapters' forward in the backward: the
    gradients are those of the plain run (the fused ops are deterministic in the forward)."""
    if backend == "triton":
        _need_triton_cpu()
    _checkpointing_same_grads(backend, "cpu")


@pytest.mark.gpu
def test_activation_checkpointing_same_grads_gpu(no_tf32):
    for backend in available_backends("cuda"):
        _checkpointing_same_grads(backend, "cuda")


# --------------------------------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------------------------------
def _autocast_run(device, dtype, kind, backend="reference"):
    """float32 eager and autocast outputs and grads of the same injected model."""
    model, shape = make_model(kind, backend=backend)
    model.to(device)
    x, y = batch(shape)
    x, y = x.to(device), y.to(device)
    out32 = model(x)
    F.cross_entropy(out32, y).backward()
    g32 = grads(model)
    model.zero_grad(set_to_none=True)
    seen = []
    a = next(m for m in model.modules() if isinstance(m, MSLoRA))
    h = a.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast(device.type, dtype=dtype):
        out = model(x)
        loss = F.cross_entropy(out, y)
    h.remove()
    loss.backward()
    g = grads(model)
    assert out.dtype == dtype
    assert seen == [dtype]  # the adapter ran in the autocast dtype
    for n, gn in g.items():  # grads land in the parameters' dtype, finite
        assert gn.dtype == torch.float32 and torch.isfinite(gn).all(), n
    return (out32, g32), (out, g)


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_autocast_bf16_cpu(kind):
    (out32, g32), (out, g) = _autocast_run(torch.device("cpu"), torch.bfloat16, kind)
    # Sanity bounds, not a precision contract (bf16 keeps 8 mantissa bits; the precision rule is
    # checked for the fused kernels against the reference in the same dtype, on the GPU): they
    # catch a wrong dtype path, a lost or rescaled gradient.
    assert rel_error(out.float(), out32) < 5e-2
    for n in g32:
        assert rel_error(g[n], g32[n]) < 0.25, n


def _autocast_fused_vs_reference(device, dtype, kind, backend):
    (out32, g32), (out_ref, g_ref) = _autocast_run(device, dtype, kind, "reference")
    _, (out, g) = _autocast_run(device, dtype, kind, backend)
    assert rel_error(out.float(), out32) <= 2 * rel_error(out_ref.float(), out32) + 1e-3
    for n in g32:
        assert rel_error(g[n], g32[n]) <= 3 * rel_error(g_ref[n], g32[n]) + 1e-3, (backend, n)


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("resnet", torch.float16), ("swin", torch.bfloat16)])
def test_autocast_triton_cpu(kind, dtype):
    """The Triton backend under CPU autocast (the interpreter), as the GPU test below runs it."""
    _need_triton_cpu()
    _autocast_fused_vs_reference(torch.device("cpu"), dtype, kind, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_autocast_gpu(kind, dtype, no_tf32):
    """Fused backends under autocast: no worse than 2x the reference's error in that dtype."""
    for backend in _fused_gpu_backends():
        _autocast_fused_vs_reference(torch.device("cuda"), dtype, kind, backend)


# --------------------------------------------------------------------------------------------------
# fp16 autocast with GradScaler: an overflow is seen and its step skipped
# --------------------------------------------------------------------------------------------------
def _grad_scaler_run(device, kind, backend, amp=True):
    """Three SGD steps under fp16 autocast and GradScaler, the second at a scale (2^40) that
    overflows fp16 in the backward, the others at 2^12. The overflow has to come out of every
    adapter's backward as inf or NaN in every weight gradient, as it does from the reference's
    (a kernel that turned it into finite numbers would hide an overflow of the adapter's own
    gradients from the scaler, and the step be taken with garbage); the scaler then skips that
    step and halves its scale. Returns how far each trained parameter moved, which steps were
    skipped and which gradients overflowed. ``amp=False``: the same in float32 without the
    overflowing step, what the two steps the scaler takes compute in exact arithmetic."""
    model, shape = make_model(kind, backend=backend)
    model.to(device)
    x, y = batch(shape)
    x, y = x.to(device), y.to(device)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in named.items()}
    params = list(named.values())
    optim = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    skipped, overflowed = [], []
    for step in range(3):
        if step == 1 and not amp:
            continue
        if step > 0:  # overflow at step 1; step 2 back at the first scale
            scaler.update(new_scale=2.0**40 if step == 1 else 2.0**12)
        before = [p.detach().clone() for p in params]
        optim.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step == 1:
            overflowed = sorted(n for n, p in named.items() if not torch.isfinite(p.grad).all())
        scale = scaler.get_scale()
        scaler.step(optim)
        scaler.update()
        skipped.append(scaler.get_scale() < scale)  # backed off: an inf or NaN was found
        if skipped[-1]:
            assert all(torch.equal(p, b) for p, b in zip(params, before))
    return {n: p.detach() - init[n] for n, p in named.items()}, skipped, overflowed


def _grad_scaler_fused_vs_reference(device, kind, backend):
    want, _, _ = _grad_scaler_run(device, kind, "reference", amp=False)
    ref, ref_skipped, ref_overflowed = _grad_scaler_run(device, kind, "reference")
    got, got_skipped, got_overflowed = _grad_scaler_run(device, kind, backend)
    assert ref_skipped == [False, True, False]
    assert got_skipped == ref_skipped, backend
    # every parameter's gradient overflowed, the adapters' too: not just the head's
    assert got_overflowed == ref_overflowed == sorted(want), backend
    for n, d in want.items():  # as the autocast test: no worse than the reference in fp16
        assert rel_error(got[n], d) <= 3 * rel_error(ref[n], d) + 1e-3, (backend, n)


@pytest.mark.interpreter
@pytest.mark.slow
def test_grad_scaler_triton_cpu():
    """Swin's case (channels-last, prenorm) under the interpreter: ResNet's takes twice as long
    there (72 s), and its layout's fp16 path is in test_autocast_triton_cpu; the GPU runs both."""
    _need_triton_cpu()
    _grad_scaler_fused_vs_reference(torch.device("cpu"), "swin", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_grad_scaler_gpu(kind, no_tf32):
    for backend in _fused_gpu_backends():
        _grad_scaler_fused_vs_reference(torch.device("cuda"), kind, backend)


# --------------------------------------------------------------------------------------------------
# torch.compile: no graph breaks from the package
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_dynamo_no_graph_breaks_reference_cpu(kind):
    """Dynamo traces the hooks and the reference adapters in one graph (no compile, just trace)."""
    model, shape = make_model(kind)
    x, _ = batch(shape)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_compile_fullgraph_gpu(kind, no_tf32):
    model, shape = make_model(kind, backend="auto")
    model.cuda()
    x, y = batch(shape)
    x, y = x.cuda(), y.cuda()
    eager_out = model(x)
    F.cross_entropy(eager_out, y).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    F.cross_entropy(out, y).backward()
    assert rel_error(out, eager_out) < 1e-4
    for n, g in grads(model).items():
        assert rel_error(g, want[n]) < 1e-4, n


# --------------------------------------------------------------------------------------------------
# DDP and FSDP2: 2 processes on gloo, loopback only
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, out_dir, body, args):
    """One rank: a gloo process group on loopback around ``body(rank, world, out_dir, *args)``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        body(rank, world, out_dir, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_gloo(body, out_dir, *args, limit_s=180):
    """``body`` in 2 gloo processes (module-level, so that the spawned workers can import it)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    ctx = mp.spawn(_gloo_worker, args=(2, _free_port(), out_dir, body, args), nprocs=2,
                   join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{body.__name__}: the workers did not finish within {limit_s} s")


def _fsdp2(model, world, device="cpu"):
    """FSDP2 over ``model``: each adapter its own unit, then the rest (adapters see unsharded
    tensors in their forward and backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    for m in model.modules():
        if isinstance(m, MSLoRA):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


GLOO_AVG_SUMS = "gloo_avg_sums"  # the marker _grads_body leaves where gloo's AVG is a sum


def _gloo_avg_sums(world) -> bool:
    """Whether this torch's gloo reduce-scatter with ReduceOp.AVG sums instead (torch 2.7 does,
    pytorch/pytorch#162338): FSDP2 reduces its gradients so, and gets world-size times them."""
    import torch.distributed as dist

    out = torch.empty(1)
    dist.reduce_scatter_tensor(out, torch.ones(world), op=dist.ReduceOp.AVG)
    return out.item() != 1.0


def _grads_body(rank, world, out_dir, kind, backend, device, wrap):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32
    if wrap == "fsdp" and device == "cpu" and _gloo_avg_sums(world):
        if rank == 0:
            open(os.path.join(out_dir, GLOO_AVG_SUMS), "w").close()
        return
    model, shape = make_model(kind, backend=backend)
    model.to(device)
    if wrap == "ddp":
        # gloo reduces CUDA tensors too, so both ranks can share the one GPU of the GPU machine
        # (NCCL refuses two ranks on one device)
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = _fsdp2(model, world, device)
    wrapped.train()
    x, y = batch(shape)
    per = shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    F.cross_entropy(wrapped(x[sl].to(device)), y[sl].to(device)).backward()
    got = grads(model)  # FSDP2's are DTensor shards of the averaged gradient: gather them
    got = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g).cpu() for n, g in got.items()}
    if rank == 0:
        torch.save(got, os.path.join(out_dir, "grads.pt"))
    # Tear DDP down while its process group still exists: letting the reducer be destroyed after
    # destroy_process_group() (when the worker's frame unwinds) sometimes hung the worker.
    del wrapped


def _dist_grads(kind, backend, device, wrap="ddp"):
    """Rank 0's gradients after one step of 2 gloo processes (`wrap`: "ddp" or "fsdp", FSDP2's
    fully_shard), each on half the batch."""
    with tempfile.TemporaryDirectory() as out_dir:
        _run_gloo(_grads_body, out_dir, kind, backend, device, wrap)
        if os.path.exists(os.path.join(out_dir, GLOO_AVG_SUMS)):
            pytest.skip(f"torch {torch.__version__}'s gloo reduce-scatter sums where FSDP2 asks "
                        "for an average (pytorch/pytorch#162338): its gradients come out "
                        "world-size times too large, whatever the model")
        return torch.load(os.path.join(out_dir, "grads.pt"))


def _dist_vs_reference(backend, device, wrap="ddp", kind="resnet", elementwise=False):
    """`wrap` over `backend` on `device`: rank 0's averaged gradients are those of the
    single-process float32 reference on the CPU (`elementwise`: to 1e-5 per element, else 1e-4
    relative, the fused kernels' float32 bound)."""
    model, shape = make_model(kind)
    x, y = batch(shape)
    F.cross_entropy(model(x), y).backward()
    want = grads(model)
    got = _dist_grads(kind, backend, device, wrap)
    assert got.keys() == want.keys()
    for n in want:
        if elementwise:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
        else:
            assert rel_error(got[n], want[n]) < 1e-4, (backend, n)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet"])
def test_ddp_gloo_grads_match_single_process(kind):
    _dist_vs_reference("reference", "cpu", kind=kind, elementwise=True)


@pytest.mark.slow
@pytest.mark.interpreter
def test_ddp_gloo_fused_triton_cpu():
    _need_triton_cpu()
    _dist_vs_reference("triton", "cpu")


@pytest.mark.gpu
@pytest.mark.slow
def test_ddp_gloo_fused_gpu():
    for backend in _fused_gpu_backends():
        _dist_vs_reference(backend, "cuda")


@pytest.mark.slow
@pytest.mark.parametrize("backend",
                         ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fsdp2_gloo_cpu(backend):
    """FSDP2 (fully_shard, each adapter its own unit): the gathered gradients are the
    single-process reference's."""
    if backend == "triton":
        _need_triton_cpu()
    _dist_vs_reference(backend, "cpu", wrap="fsdp")


def _fsdp2_checkpoint_body(rank, world, out_dir):
    """save_adapter under FSDP2 (counting the files each rank writes), then what a sharded
    model's inject and load_adapter raise, into out_dir/errors<rank>.json."""
    import safetensors.torch

    from mslora_kernels import load_adapter, save_adapter
    from mslora_kernels.models import ResNet

    model, _ = make_model("resnet")
    _fsdp2(model, world)
    ckpt = os.path.join(out_dir, "ckpt")
    writes, save_file = [], safetensors.torch.save_file
    safetensors.torch.save_file = lambda *a, **k: (writes.append(1), save_file(*a, **k))
    try:
        save_adapter(model, ckpt)  # on every rank: it gathers the shards
    finally:
        safetensors.torch.save_file = save_file
    errors = {"writes": len(writes)}
    fresh = ResNet(layers=(1, 1, 1), widths=(8, 16, 32), in_chans=3, num_classes=5)
    _fsdp2(fresh, world)
    for name, call in [("inject", lambda: inject(fresh, MSLoRAConfig(**CFG))),
                       ("load_adapter", lambda: load_adapter(fresh, ckpt))]:
        try:
            call()
        except TypeError as e:
            errors[name] = str(e)
    with open(os.path.join(out_dir, f"errors{rank}.json"), "w") as f:
        json.dump(errors, f)


@pytest.mark.slow
def test_fsdp2_save_adapter_gathers_and_sharded_models_are_refused():
    """Under FSDP2, save_adapter on every rank writes the whole adapters once (rank 0), which
    load into a fresh model bit for bit; inject and load_adapter refuse an already sharded model,
    whose new adapters FSDP would never reduce."""
    from mslora_kernels import load_adapter
    from mslora_kernels.models import ResNet

    want, _ = make_model("resnet")
    with tempfile.TemporaryDirectory() as out_dir:
        _run_gloo(_fsdp2_checkpoint_body, out_dir)
        loaded = load_adapter(ResNet(layers=(1, 1, 1), widths=(8, 16, 32), in_chans=3,
                                     num_classes=5), os.path.join(out_dir, "ckpt"))
        errors = []
        for r in (0, 1):
            with open(os.path.join(out_dir, f"errors{r}.json")) as f:
                errors.append(json.load(f))
    got = dict(loaded.named_parameters())
    trained = {n: p for n, p in want.named_parameters() if p.requires_grad}
    assert {n for n, p in got.items() if p.requires_grad} == trained.keys()
    for n, p in trained.items():
        assert torch.equal(got[n], p), n
    assert [e["writes"] for e in errors] == [1, 0]  # rank 0 wrote, rank 1 did not
    for e in errors:
        assert e.keys() == {"writes", "inject", "load_adapter"}, e
        assert "is a DTensor" in e["inject"] and "inject into the unsharded model" in e["inject"]
        assert "load into the unsharded model" in e["load_adapter"]
