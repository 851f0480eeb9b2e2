"""What a first GPU run relies on, shown on the CPU (issue 25): a run continued under another
resolution of its params (device type, precision, memory format) gets its optimizer state
converted; train.memory_format; train.deterministic; the one-process device; CUDA-graph steps."""

import contextlib
import copy
import os
from dataclasses import replace

import pytest
import torch

from stages.train import train
from tests.test_train import TINY, make_prepared
from unpaired import checkpoint
from unpaired.distributed import Rank
from unpaired.models.cyclegan import CycleGAN, optimizers
from unpaired.models.feeding import DeviceFeeder
from unpaired.models.loop import process_device, setup_device, train_epoch
from unpaired.models.networks import (
    DeterministicReflectionPad2d,
    ResnetGenerator,
    deterministic_padding,
)
from unpaired.models.progress import Progress
from unpaired.models.state import TrainState, stored_resolution
from unpaired.models.training import TrainParams, use_channels_last
from unpaired.params import ParamsError, parse

CPU = torch.device("cpu")


def fuse(state: TrainState) -> None:
    """Rebuild the state's optimizers as fused Adam, as CycleGAN builds them on CUDA (CPU fused Adam
    is torch's own kernel too)."""
    m = state.model
    m.optimizers = dict(zip(m.OPTIMIZERS, optimizers(m.models, TINY.lr, TINY.beta1, fused=True)))
    state.schedules = state._schedules()


def trained(channels_last: bool, fused: bool) -> TrainState:
    """TINY on the CPU after two steps, its networks channels-last or not, its Adam fused or not:
    what a CUDA run (fused, channels-last) or a CPU run (neither) writes to last.pt."""
    state = TrainState.new(CycleGAN, TINY, CPU, Rank(), [], channels_last)
    if fused:
        fuse(state)
    g = torch.Generator().manual_seed(5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _ in range(2):
        a, b = (
            torch.rand(2, 3, 24, 24, generator=g).mul(2).sub(1).contiguous(memory_format=fmt)
            for _ in "ab"
        )
        state.model.step(a, b, contextlib.nullcontext)
    return state


def adam_step(state: TrainState, seed: int = 9) -> dict[str, torch.Tensor]:
    """One more Adam step of every optimizer on fixed gradients (the same values whatever the
    layout); the weights after it, as contiguous values."""
    g = torch.Generator().manual_seed(seed)
    for opt in state.model.optimizers.values():
        for group in opt.param_groups:
            for w in group["params"]:
                w.grad = torch.empty_like(w).copy_(torch.randn(w.shape, generator=g))
        opt.step()
    return {
        f"{n}.{k}": v.detach().contiguous()
        for n, net in state.model.nets.items()
        for k, v in net.state_dict().items()
    }


@pytest.mark.parametrize(
    "saved, resumed",
    [
        (
            (True, True),
            (False, False),
        ),  # a CUDA run (channels-last, fused Adam) continued on the CPU
        ((True, False), (False, False)),  # channels-last, unfused, continued contiguous
        ((False, False), (False, True)),  # a CPU run continued with fused Adam (as on CUDA)
        ((False, False), (True, True)),  # ... in channels-last too
    ],
)
def test_a_resume_under_another_resolution_converts_the_optimizer_state(
    saved, resumed, tmp_path, capsys
):
    """The moments take their weights' strides and `fused` is the resuming optimizer's own; the next
    Adam step then moves each weight as the writer's own next step does. Before the conversion,
    torch kept the stored `fused` and strides: CPU fused Adam then moved channels-last moments onto
    other weights (first case: weights off by 3.1e-4 after that one step of lr 2e-4)."""
    old = trained(*saved)
    checkpoint.save(old.state_dict(), tmp_path / "last.pt")
    new = TrainState.new(CycleGAN, TINY, CPU, Rank(), [], resumed[0])
    if resumed[1]:
        fuse(new)
    new.load_state_dict(checkpoint.load(tmp_path / "last.pt"), tmp_path / "last.pt")
    for opt in new.model.optimizers.values():
        assert all(group["fused"] == (True if resumed[1] else None) for group in opt.param_groups)
        for w, moments in opt.state.items():
            assert moments["exp_avg"].stride() == moments["exp_avg_sq"].stride() == w.stride()
    want, got = adam_step(old), adam_step(new)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key
    line = capsys.readouterr().out
    if saved[0] != resumed[0]:
        layouts = ("channels_last", "contiguous") if saved[0] else ("contiguous", "channels_last")
        assert (
            f"memory_format {layouts[0]} -> {layouts[1]}" in line
            and "optimizer state converted" in line
        )
    else:
        assert line == ""


def test_last_pt_records_the_resolution_and_older_ones_still_resume(tmp_path, capsys):
    """last.pt holds the resolved device type, precision and memory format. One written before they
    were recorded resumes as before (precision as `auto` resolved on its device, the layout read
    from its weights); one written on another device type says so in one line and continues."""
    data = make_prepared(tmp_path / "prepared")
    out = tmp_path / "ckpt"
    train(TINY, data, out, tmp_path / "live", stop_after=1)
    last = checkpoint.load(out / "last.pt")
    assert (last["device"], last["precision"], last["memory_format"]) == (
        "cpu",
        "fp32",
        "contiguous",
    )
    older = {
        k: v for k, v in last.items() if k not in ("precision", "memory_format", checkpoint.DIGEST)
    }
    older["run_params"] = {
        k: v for k, v in last["run_params"].items() if k != "memory_format"
    }  # added later
    assert stored_resolution(older) == {
        "device": "cpu",
        "precision": "fp32",
        "memory_format": "contiguous",
    }
    assert (
        stored_resolution({**older, "device": "cuda"})["precision"] == "bf16"
    )  # auto, then, on CUDA
    checkpoint.save(older, out / "last.pt")
    capsys.readouterr()
    train(replace(TINY, epochs=1, epochs_decay=1), data, out, tmp_path / "live", stop_after=1)
    said = capsys.readouterr().out
    assert "resuming from" in said and "starting afresh" not in said and "resolution" not in said
    checkpoint.save({**older, "device": "cuda"}, out / "last.pt")
    train(TINY, data, out, tmp_path / "live")
    said = capsys.readouterr().out
    assert "resuming from" in said and "(device cuda -> cpu, precision bf16 -> fp32)" in said
    assert checkpoint.load(out / "last.pt")["epoch"] == 2


# --- train.memory_format --------------------------------------------------------------------------


def test_memory_format_auto_is_contiguous_and_channels_last_is_refused_where_wrong(tmp_path):
    """auto is contiguous everywhere (channels-last is not measured faster; it was on by default on
    CUDA); channels_last where channels_last_ok fails (the CPU) stops in one line, before anything
    is written."""
    assert parse(TrainParams, {}, "train").memory_format == "auto"
    assert not use_channels_last("auto", torch.device("cuda")) and not use_channels_last(
        "contiguous", CPU
    )
    data = make_prepared(tmp_path / "prepared")
    with pytest.raises(
        ParamsError,
        match=r"^params.yaml: train.memory_format: channels_last computes instance "
        r"norm's input gradient wrong on cpu \(training.channels_last_ok\); "
        r"use auto or contiguous$",
    ):
        train(
            replace(TINY, memory_format="channels_last"), data, tmp_path / "ckpt", tmp_path / "live"
        )
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "live").exists()
    with pytest.raises(ParamsError, match=r"^params.yaml: train.memory_format: "):
        parse(TrainParams, {"memory_format": "nhwc"}, "train")


# --- train.deterministic --------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [1, 3, (2, 1, 0, 3)])
def test_deterministic_reflection_padding_matches_torchs(padding):
    """The padding a deterministic CUDA run gives the generators (torch's CUDA ReflectionPad2d backward
    uses atomicAdd and raises under deterministic algorithms): the same output, and the same input
    gradient up to float64 rounding, in both memory formats."""
    g = torch.Generator().manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 4, 7, 9, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = (
            DeterministicReflectionPad2d(padding)(ours),
            torch.nn.ReflectionPad2d(padding)(theirs),
        )
        assert torch.equal(out, ref)
        up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        out.backward(up)
        ref.backward(up)
        assert torch.allclose(ours.grad, theirs.grad, rtol=0, atol=1e-14)


def test_deterministic_padding_keeps_the_generator_and_its_gradients():
    """deterministic_padding swaps every reflection pad of a generator and keeps its state dict; its
    weights' gradients under deterministic algorithms equal the plain generator's (float64); dynamo
    compiles it without a graph break."""
    torch.manual_seed(0)
    plain = ResnetGenerator(ngf=4, n_blocks=2).double()
    G = copy.deepcopy(plain)
    deterministic_padding(G)
    assert sum(type(m) is torch.nn.ReflectionPad2d for m in plain.modules()) == 6
    assert sum(isinstance(m, DeterministicReflectionPad2d) for m in G.modules()) == 6
    assert (
        not any(type(m) is torch.nn.ReflectionPad2d for m in G.modules())
        and G.state_dict().keys() == plain.state_dict().keys()
    )
    x = (
        torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        * 2
        - 1
    )
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for net in (plain, G):
            net(x).square().mean().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    for (name, p), q in zip(plain.named_parameters(), G.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-9, atol=1e-15), name
    explained = torch._dynamo.explain(G)(x)  # and torch.compile takes it whole
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_deterministic_setting_of_the_device(monkeypatch):
    """train.deterministic: deterministic algorithms, cuDNN without autotuning and in deterministic
    mode, CUBLAS_WORKSPACE_CONFIG set (before any CUDA work; a value of the user's is kept)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    for attr in ("benchmark", "deterministic"):
        monkeypatch.setattr(torch.backends.cudnn, attr, getattr(torch.backends.cudnn, attr))
    setup_device(replace(TINY, device="cpu", deterministic=True), Rank())
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    setup_device(replace(TINY, device="cpu", deterministic=True), Rank())
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    setup_device(replace(TINY, device="cpu"), Rank())
    assert (
        torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    )  # CPU: always


# --- the one-process device, CUDA-graph steps, full batches ----------------------------------------


def test_each_process_trains_on_its_own_device_and_a_replaced_cuda_n_is_said():
    """One process trains on train.device as named (cuda:1 stays cuda:1; setup_device makes it the
    current device, where it made cuda:0 current before); each process of a data-parallel run on
    CUDA takes cuda:LOCAL_RANK, and a cuda:N in params is then said not to be used, in one line."""
    cuda1 = torch.device("cuda", 1)
    assert process_device(cuda1, Rank()) == (cuda1, None)
    assert process_device(CPU, Rank(1, 2, 1, 2)) == (CPU, None)
    assert process_device(torch.device("cuda"), Rank(1, 2, 1, 2)) == (cuda1, None)
    device, line = process_device(torch.device("cuda", 0), Rank(1, 2, 1, 2))
    assert device == cuda1 and line == (
        "train: train.device cuda:0 is not used by a run of 2 processes: each "
        "trains on cuda:LOCAL_RANK (cuda:0 to cuda:1 on this node); say "
        "train.device: cuda (or auto) to silence this"
    )


def test_reduce_overhead_marks_a_cuda_graph_step_per_step(monkeypatch):
    """Under compile: reduce-overhead every step begins with torch.compiler.cudagraph_mark_step_begin
    (torch's counter of marked steps goes down by one per step): the G step's outputs, which the D
    step reads through the pool, stay valid until the step ends. Other settings mark nothing."""
    from torch._inductor.cudagraph_trees import MarkStepBox

    monkeypatch.setattr(MarkStepBox, "mark_step_counter", 0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=g)
    for compile_, marks in ((False, 0), ("default", 0), ("reduce-overhead", -3)):
        p = replace(TINY, compile=compile_)
        state = TrainState.new(CycleGAN, p, CPU, Rank(), [], False)
        feeder = DeviceFeeder(images, images, 24, True, 1, CPU, False)
        progress = Progress(feeder.steps_per_epoch, 1, state.total, "", state.model.LOSS_NAMES)
        before = MarkStepBox.mark_step_counter
        train_epoch(state, feeder, progress, contextlib.nullcontext)
        assert MarkStepBox.mark_step_counter - before == marks, compile_


def test_every_batch_is_full():
    """A short last batch would recompile a compiled step (a new shape): the epoch is padded by
    wrapping to full batches, as a data-parallel run's always was. 5 images at batch 2: 3 steps of
    2, the last one the 5th image and the 1st again; batch 1 (the default) is unchanged."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=g)
    feeder = DeviceFeeder(a, b, 24, False, 2, CPU, False)
    plan = feeder.plan(torch.Generator().manual_seed(3))
    assert feeder.images_per_epoch == 6 and len(plan["a"]) == 6 and plan["a"][5] == plan["a"][0]
    batches = list(feeder.batches(plan))
    assert [len(x) for x, _ in batches] == [2, 2, 2] and torch.equal(
        batches[2][0][1], batches[0][0][0]
    )
    one = DeviceFeeder(a, b, 24, False, 1, CPU, False)
    assert one.images_per_epoch == 5 and len(one.plan(torch.Generator().manual_seed(3))["a"]) == 5
