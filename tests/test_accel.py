"""Every accelerator code path, run on the CPU: batched passes, memory formats, bf16 autocast, compile."""

import contextlib
import copy
import os
from pathlib import Path

import pytest
import torch

from unpaired.models.cyclegan import build_models, compile_models, optimizers, train_step
from unpaired.models.feeding import DeviceFeeder, place_images
from unpaired.models.pool import ImagePool
from unpaired.models.training import channels_last_ok

CPU = torch.device("cpu")


def pair(batch: int, size: int = 24, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(batch, 3, size, size, generator=g, dtype=dtype) * 2 - 1,
        torch.rand(batch, 3, size, size, generator=g, dtype=dtype) * 2 - 1,
    )


def one_step(
    models, a, b, batched: bool, pool_size: int = 3, autocast=contextlib.nullcontext, steps=None
):
    """Losses and every parameter's gradient of the last of `steps` train_steps (default: fill the
    pools, then a step that swaps; G grads from the G step, D grads from the D step), plus the
    weights after it."""
    m = copy.deepcopy(models)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(1)
    pool_A, pool_B = ImagePool(pool_size, g), ImagePool(pool_size, g)
    losses = None
    for _ in range(steps or pool_size + 2):
        losses = train_step(m, opt_G, opt_D, pool_A, pool_B, a, b, 10.0, 0.5, autocast, batched)
    grads = {
        n: [p.grad.double() for p in getattr(m, n).parameters()]
        for n in ("G_A", "G_B", "D_A", "D_B")
    }
    return losses.double(), grads, m


def relative(x, ref) -> float:
    """Norm-wise relative error of a network's whole gradient, ||x - ref|| / ||ref||: a wrong kernel
    is off by O(1); float32 rounding, amplified where instance norm sees a near-constant map, stays
    well below 1e-2 (a few elements' max-abs error can reach 5e-2 there at 64 px)."""
    x, ref = torch.cat([t.flatten() for t in x]), torch.cat([t.flatten() for t in ref])
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("batch", [1, 2])
def test_batched_passes_equal_the_reference_order(batch):
    torch.manual_seed(0)
    models = build_models(4, 4, 1, 3, CPU, False, dtype=torch.float64)
    a, b = pair(batch)
    loss_ref, grad_ref, m_ref = one_step(models, a, b, batched=False)
    loss, grad, m = one_step(models, a, b, batched=True)
    assert torch.allclose(loss, loss_ref, rtol=1e-9, atol=0)
    for name in grad:
        assert relative(grad[name], grad_ref[name]) < 1e-9, name
    # the pools made the same choices: the D step saw the same images
    assert torch.allclose(m.D_A.model[0].weight, m_ref.D_A.model[0].weight, rtol=1e-9, atol=1e-12)


def test_gradients_in_every_memory_format_and_arrangement():
    """One step's gradients, float32, in each memory format × batch arrangement × batch size the
    product can run, against float64 contiguous in the reference order. Contiguous must always be
    right; channels-last is what `channels_last_ok` (the stage's test before using it) predicts."""
    torch.manual_seed(0)
    models64 = build_models(4, 4, 1, 3, CPU, False, dtype=torch.float64)
    errors = {}
    for batch in (1, 2):
        a, b = pair(batch)
        _, ref, _ = one_step(models64, a, b, batched=False, steps=1)
        for fmt in (torch.contiguous_format, torch.channels_last):
            models = copy.deepcopy(models64)
            for net in models.nets():
                net.to(dtype=torch.float32, memory_format=fmt)
            a32, b32 = (x.float().contiguous(memory_format=fmt) for x in (a, b))
            for batched in (False, True):
                _, grads, _ = one_step(models, a32, b32, batched, steps=1)
                errors[str(fmt), batched, batch] = max(relative(grads[n], ref[n]) for n in ref)
    contiguous = {k: v for k, v in errors.items() if k[0] == str(torch.contiguous_format)}
    assert max(contiguous.values()) < 1e-3, contiguous
    channels_last = {k: v for k, v in errors.items() if k[0] == str(torch.channels_last)}
    assert (max(channels_last.values()) < 1e-3) == channels_last_ok(CPU), channels_last


def test_channels_last_trains_where_it_is_right():
    """Channels-last at batch 2 (right on CPU, see above): a few steps, finite, close to contiguous."""
    torch.manual_seed(0)
    models = build_models(4, 4, 1, 3, CPU, False)
    a, b = pair(2, dtype=torch.float32)
    loss_ref, _, _ = one_step(models, a, b, batched=True)
    cl = copy.deepcopy(models)
    for net in cl.nets():
        net.to(memory_format=torch.channels_last)
    loss, _, _ = one_step(
        cl, *(x.contiguous(memory_format=torch.channels_last) for x in (a, b)), batched=True
    )
    assert torch.isfinite(loss).all() and torch.allclose(loss, loss_ref, rtol=1e-4)


def loss_curve(seed: int, bf16: bool, steps: int = 120) -> torch.Tensor:
    """steps×8 losses of small networks on 16 fixed pairs (B a darker, different domain)."""
    torch.manual_seed(seed)
    m = build_models(4, 4, 1, 3, CPU, False)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(seed)
    pool_A, pool_B = ImagePool(10, g), ImagePool(10, g)
    a, b = pair(16, dtype=torch.float32, seed=100)
    b = b.clamp(-1, 0) * 2 + 1
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    return torch.stack(
        [
            train_step(
                m,
                opt_G,
                opt_D,
                pool_A,
                pool_B,
                a[i % 16 : i % 16 + 1],
                b[i * 7 % 16 : i * 7 % 16 + 1],
                10.0,
                0.5,
                autocast,
            )
            for i in range(steps)
        ]
    )


def test_bf16_loss_curves_stay_within_seed_noise():
    """bf16 autocast vs fp32 on the same data and init: the mean losses over each half of the run
    differ far less than two fp32 runs that differ only by their seed (measured: at most 0.045 vs
    0.24 max relative difference). Were bf16 to drift beyond that noise, fp32 would be the default."""
    fp32, bf16, other = loss_curve(0, False), loss_curve(0, True), loss_curve(1, False)
    assert torch.isfinite(bf16).all()
    rel = lambda x, y: ((x - y).abs() / y.abs()).max().item()  # noqa: E731
    for half in (slice(0, 60), slice(60, 120)):
        drift = rel(bf16[half].mean(0), fp32[half].mean(0))
        noise = rel(other[half].mean(0), fp32[half].mean(0))
        assert drift < 0.5 * noise, (half, drift, noise)


def test_compiled_step_has_no_graph_breaks_and_matches_eager():
    """The pair modules compile whole (dynamo finds no graph break) and train as eager does; the
    G step's D passes (`judges`) are compiled too, not left eager. Backend aot_eager: dynamo + AOT
    autograd as with inductor, without inductor's C++ build (minutes on 2 cores);
    benchmarks/gpu_check.sh runs inductor with both modes on CUDA."""
    torch.manual_seed(0)
    models = build_models(4, 4, 1, 3, CPU, False)
    a, b = pair(1, dtype=torch.float32)
    for module, args in (
        (models.generators, (a, b, True, True)),
        (models.discriminators, (a, b, a, b, True)),
        (models.judges, (a, b)),
    ):
        explained = torch._dynamo.explain(module)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (
            explained.break_reasons
        )
    loss_ref, grads_ref, _ = one_step(models, a, b, batched=True)
    torch._dynamo.reset()
    compiled = compile_models(models, "default", backend="aot_eager")
    assert all(
        isinstance(getattr(compiled, k), torch._dynamo.eval_frame.OptimizedModule)
        for k in ("generators", "discriminators", "judges")
    )
    loss, grads, _ = one_step(compiled, a, b, batched=True)
    assert torch.isfinite(loss).all() and torch.allclose(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name in grads:
        assert relative(grads[name], grads_ref[name]) < 1e-4, name


def test_images_on_the_host_give_the_same_batches():
    """data_device host: whole images gathered on the host and copied per batch (pinned and
    asynchronous on CUDA), cropped on the device: the same batches as images on the device."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=g)
    on_device = DeviceFeeder(a, b, 24, True, 2, CPU, False)
    on_host = DeviceFeeder(a, b, 24, True, 2, CPU, False, data_device=CPU, copy_per_batch=True)
    assert on_host.host and not on_device.host
    one = list(on_device.batches(on_device.plan(torch.Generator().manual_seed(3))))
    two = list(on_host.batches(on_host.plan(torch.Generator().manual_seed(3))))
    assert len(one) == len(two) == 3
    assert all(torch.equal(x, y) for p, q in zip(one, two) for x, y in zip(p, q))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: auto picks by free GPU memory"
)
def test_data_device_auto_on_cuda():
    cuda = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(cuda)
    assert place_images("auto", cuda, 1 << 20).device == cuda
    placed = place_images("auto", cuda, int(free * 0.5))
    assert placed.place == "host" and placed.device == CPU and "pinned host memory" in placed.why


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"compile": "max"}, "train.compile"),
        ({"devices": 0}, "train.devices"),
        ({"lr_scaling": "cubic"}, "train.lr_scaling"),
        ({"data_device": "gpu"}, "train.data_device"),
    ],
)
def test_bad_speed_params_name_the_key(raw, key):
    from unpaired.models.training import TrainParams
    from unpaired.params import ParamsError, parse

    with pytest.raises(ParamsError, match=f"^params.yaml: {key}: "):
        parse(TrainParams, raw, "train")


def test_compile_modes_and_lr_scaling():
    from unpaired.models.training import TrainParams
    from unpaired.params import parse

    modes = [
        parse(TrainParams, {"compile": v}, "train").compile_mode
        for v in (False, True, "default", "reduce-overhead")
    ]
    assert modes == [None, "default", "default", "reduce-overhead"]
    lrs = [
        parse(TrainParams, {"lr_scaling": r}, "train").scaled_lr(4)
        for r in ("none", "linear", "sqrt")
    ]
    assert lrs == pytest.approx([2e-4, 8e-4, 4e-4])


def test_native_bf16_is_read_from_the_cpu_flags():
    """precision: auto never picks bf16 on a CPU; bf16 asked for on a CPU without native bf16
    instructions gets one warning line naming the key."""
    from unpaired import devices

    x86_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    x86_bf16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    arm_bf16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert devices.cpu_bf16_native(x86_avx2) is False
    assert devices.cpu_bf16_native(x86_bf16) is True and devices.cpu_bf16_native(arm_bf16) is True
    assert not devices.bf16_for(CPU, "auto") and devices.bf16_for(CPU, "bf16")
    assert (
        devices.precision_warning(CPU, "auto") is None
        and devices.precision_warning(CPU, "fp32") is None
    )
    with open("/proc/cpuinfo") as f:
        here = devices.cpu_bf16_native(f.read())
    warning = devices.precision_warning(CPU, "bf16")
    assert (warning is None) == here
    if warning:
        assert warning.startswith(
            "warning: params.yaml: train.precision: bf16 on a CPU without native bf16"
        )


def test_compile_caches_persist_outside_tmp(monkeypatch, tmp_path):
    """compile_models points inductor's caches at ~/.cache/unpaired (or $XDG_CACHE_HOME/unpaired),
    which outlives a reboot, unless the user chose TORCHINDUCTOR_CACHE_DIR."""
    from unpaired.models.training import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    models = build_models(2, 2, 1, 1, CPU, False)
    compile_models(models, "default", backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "xdg" / "unpaired" / "torchinductor"
    )
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == os.environ["TORCHINDUCTOR_CACHE_DIR"]  # what inductor will use
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache_dir() == Path.home() / ".cache" / "unpaired" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_models(models, "default", backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
