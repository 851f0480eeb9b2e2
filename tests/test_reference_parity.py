"""Parity with the references' own code, on the CPU: CUT / FastCUT against
taesungp/contrastive-unpaired-translation (the folder named by CUT_REFERENCE: a `git archive` of its
models/, options/, util/, data/), CycleGAN against junyanz/pytorch-CycleGAN-and-pix2pix (the folder
named by CYCLEGAN_REFERENCE). Nothing of a reference is committed here: each test is skipped with
the reason when its variable is absent (`make parity` sets both to /work/ref/...; see docs/training.md).

Each test: the reference's defaults, read from its own option parser, are ours; the parameter
counts of G, D (and F) agree; from the same seed both build the same weights; from the same
weights and inputs one reference `optimize_parameters` and one step of ours give the same losses
and the same updated weights, to float tolerance. The reference draws its random patches and flips
from numpy's global stream: the test seeds it, then replays the same numpy calls in the reference's
order to pass the same positions and flip to our step.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unpaired.models import cut, cyclegan
from unpaired.models.networks import PatchSampleF, ResnetGenerator, count_parameters
from unpaired.models.pool import ImagePool
from unpaired.models.training import AUTO, TrainParams

PACKAGES = ("models", "util", "options", "data")  # a reference's top-level packages


def reference_folder(variable: str) -> Path:
    folder = os.environ.get(variable)
    if not folder:
        pytest.skip(f"{variable} is not set: the folder of the reference's code (not committed)")
    if not (Path(folder) / "models" / "networks.py").is_file():
        pytest.skip(f"{variable}={folder} holds no models/networks.py")
    return Path(folder)


@contextlib.contextmanager
def reference(folder: Path, argv: list[str]):
    """The reference's packages importable from `folder` (and nothing of another reference's), with
    `argv` as the command line its option parsers read; everything put back afterwards."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in PACKAGES}
    old_argv = sys.argv
    sys.path.insert(0, str(folder))
    sys.argv = ["train.py", *argv]
    try:
        yield
    finally:
        sys.argv = old_argv
        sys.path.remove(str(folder))
        for k in [k for k in sys.modules if k.split(".")[0] in PACKAGES]:
            del sys.modules[k]
        sys.modules.update(saved)


def parse_options():
    """The reference's own TrainOptions().parse() (it reads sys.argv: `reference` sets it), silenced."""
    from options.train_options import TrainOptions

    with contextlib.redirect_stdout(None):
        return TrainOptions().parse()


def norm_cancelled(net: torch.nn.Module) -> set[str]:
    """The biases of the convs right before an instance norm without affine parameters: the norm
    subtracts each channel's mean, so their exact gradient is 0 and what backward gives is float
    rounding, whose sign Adam's first step turns into a move of ±lr. Those are compared by that
    bound; every other weight to float tolerance."""
    found = set()
    for prefix, module in net.named_modules():
        if isinstance(module, torch.nn.Sequential):
            layers = list(module)
            for i, (layer, after) in enumerate(zip(layers, layers[1:])):
                if isinstance(layer, torch.nn.Conv2d | torch.nn.ConvTranspose2d) and isinstance(
                    after, torch.nn.InstanceNorm2d
                ):
                    found.add(f"{prefix}.{i}.bias".lstrip("."))
    return found


def same_step(net, before, theirs, what: str, tol: float, lr: float = 0.0002) -> None:
    """`net`'s weights after a step equal the reference's (`theirs`) to `tol`, apart from the
    norm-cancelled biases, which both moved from `before` by at most one Adam step (lr)."""
    ours = net.state_dict()
    assert set(ours) == set(theirs), what
    cancelled = norm_cancelled(net)
    for k in ours:
        if k in cancelled:
            for side in (ours[k], theirs[k]):
                assert (side - before[k]).abs().max() <= lr * 1.001, f"{what} {k}"
        else:
            torch.testing.assert_close(ours[k], theirs[k], rtol=tol, atol=tol, msg=f"{what} {k}")


def renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference network's state dict under our names: ResnetBlock's conv_block is our body; F's
    mlp_i our mlps.i; the blur filters (constants: our buffers are not persistent) left out."""
    out = {}
    for k, v in state.items():
        if k.endswith(".filt"):
            continue
        k = k.replace(".conv_block.", ".body.")
        if k.startswith("mlp_"):
            k = "mlps." + k[len("mlp_") :]
        out[k] = v.detach().clone()
    return out


# --- CUT and FastCUT ------------------------------------------------------------------------------
CUT_SMALL = [
    "--gpu_ids", "-1", "--ngf", "8", "--ndf", "8", "--netG", "resnet_6blocks", "--num_patches",
    "16", "--netF_nc", "32", "--batch_size", "2", "--crop_size", "32", "--load_size", "32",
]  # fmt: skip


def cut_argv(tmp_path: Path, mode: str, small: bool) -> list[str]:
    return ["--checkpoints_dir", str(tmp_path), "--CUT_mode", mode] + (
        CUT_SMALL if small else ["--gpu_ids", "-1"]
    )


@pytest.mark.parametrize("mode", ["CUT", "FastCUT"])
def test_cut_parity_defaults_and_counts(mode, tmp_path):
    """Our train.model cut / fastcut defaults are the reference's, as its own parser gives them
    (models/cut_model.py, options/*.py), and G, D, F have its parameter counts at its defaults."""
    folder = reference_folder("CUT_REFERENCE")
    p = TrainParams(model=mode.lower())
    with reference(folder, cut_argv(tmp_path, mode, small=False)):
        opt = parse_options()
        from models import networks

        ref_G = networks.define_G(3, 3, 64, opt.netG, opt.normG, not opt.no_dropout, opt.init_type, opt.init_gain, opt.no_antialias, opt.no_antialias_up, [], opt)  # fmt: skip
        ref_D = networks.define_D(3, 64, opt.netD, opt.n_layers_D, opt.normD, opt.init_type, opt.init_gain, opt.no_antialias, [], opt)  # fmt: skip
        ref_F = networks.define_F(3, opt.netF, opt.normG, not opt.no_dropout, opt.init_type, opt.init_gain, opt.no_antialias, [], opt)  # fmt: skip
        ours_G = ResnetGenerator(ngf=64, n_blocks=9, antialias=True)
        feats = ours_G.encode(torch.zeros(1, 3, 32, 32), p.nce_layers)
        ref_F.create_mlp(feats)
    theirs = {
        "lambda_gan": opt.lambda_GAN,
        "lambda_nce": opt.lambda_NCE,
        "nce_idt": opt.nce_idt,
        "nce_layers": tuple(int(i) for i in opt.nce_layers.split(",")),
        "num_patches": opt.num_patches,
        "netF_nc": opt.netF_nc,
        "nce_T": opt.nce_T,
        "flip_equivariance": opt.flip_equivariance,
        "antialias": not opt.no_antialias and not opt.no_antialias_up,
    }
    assert {k: p.resolved(k) if k in AUTO else getattr(p, k) for k in theirs} == theirs
    assert (opt.lr, opt.beta1, opt.beta2, opt.gan_mode) == (p.lr, p.beta1, 0.999, "lsgan")
    assert (opt.init_type, opt.init_gain, opt.pool_size, opt.netF) == (
        "xavier",
        0.02,
        0,
        "mlp_sample",
    )
    assert (opt.netG, opt.netD, opt.n_layers_D, opt.normG, opt.normD) == (
        "resnet_9blocks", "basic", 3, "instance", "instance",
    )  # fmt: skip
    assert not opt.nce_includes_all_negatives_from_minibatch
    assert (opt.n_epochs, opt.n_epochs_decay) == {"CUT": (200, 200), "FastCUT": (150, 50)}[mode]
    ours_F = PatchSampleF(nc=p.netF_nc)
    ours_F.create([f.shape[1] for f in feats])
    counts = [count_parameters(n) for n in (ref_G, ref_D, ref_F)]
    assert counts == [11_378_179, 2_764_737, 560_384]
    assert [count_parameters(n) for n in (ours_G, cut.PatchDiscriminator(ndf=64, antialias=True), ours_F)] == counts  # fmt: skip


@pytest.mark.parametrize(
    "mode, seed, batched", [("CUT", 0, False), ("CUT", 0, True), ("FastCUT", 1, False)]
)
def test_cut_parity_one_step(mode, seed, batched, tmp_path):
    """One reference CUTModel.optimize_parameters (after its data_dependent_initialize, as its
    train.py runs them) and one of our train_step: the same initial weights from the same seed, the
    same losses, the same weights of G, D and F after the step. FastCUT at seed 1 flips."""
    folder = reference_folder("CUT_REFERENCE")
    g = torch.Generator().manual_seed(7)
    real_A, real_B = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    with reference(folder, cut_argv(tmp_path, mode, small=True)):
        opt = parse_options()
        from models.cut_model import CUTModel

        torch.manual_seed(0)
        ref = CUTModel(opt)
        data = {"A": real_A.clone(), "B": real_B.clone(), "A_paths": ["a"], "B_paths": ["b"]}
        np.random.seed(100)
        ref.data_dependent_initialize(data)
        before = {n: renamed(getattr(ref, f"net{n}").state_dict()) for n in ("G", "D", "F")}
        ref.set_input(data)
        np.random.seed(seed)
        ref.optimize_parameters()
        ref_losses = [
            float(torch.as_tensor(getattr(ref, f"loss_{n}", 0.0)).detach()) for n in cut.LOSS_NAMES
        ]
        after = {n: renamed(getattr(ref, f"net{n}").state_dict()) for n in ("G", "D", "F")}
        flipped = getattr(ref, "flipped_for_equivariance", False)

    p = TrainParams(
        model=mode.lower(), ngf=8, ndf=8, n_blocks=6, crop_size=32, load_size=32,
        num_patches=16, netF_nc=32, batch_size=2, batched_passes=batched,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = cut.CUT(p, torch.device("cpu"), 1, torch.Generator().manual_seed(0), False)
    for name, net in ours.nets.items():  # the same draws of torch's stream, in the same order
        state = net.state_dict()
        assert set(state) == set(before[name]), name
        assert all(torch.equal(state[k], before[name][k]) for k in state), f"init {name}"
    # the reference's draws, replayed: the flip (FastCUT), then each NCE loss's layers' positions
    np.random.seed(seed)
    flip = bool(np.random.random() < 0.5) if p.resolved("flip_equivariance") else False
    assert flip == flipped and (flip or mode == "CUT")
    ids = [
        [torch.from_numpy(np.random.permutation(hw)[: p.num_patches]) for hw in ours.positions]
        for _ in range(2 if p.resolved("nce_idt") else 1)
    ]
    losses = cut.train_step(
        ours.models, *ours.optimizers.values(), real_A, real_B, p, flip, ids, contextlib.nullcontext
    )
    tol = 1e-5 if batched else 1e-6
    torch.testing.assert_close(losses, torch.tensor(ref_losses), rtol=tol, atol=tol)
    for name, net in ours.nets.items():
        same_step(net, before[name], after[name], f"after {name}", tol)
    assert any(not torch.equal(after["G"][k], before["G"][k]) for k in after["G"])  # it moved


# --- CycleGAN -------------------------------------------------------------------------------------
def test_cyclegan_parity_counts(tmp_path):
    """G at 9 and 6 blocks and D of the CycleGAN reference (define_G / define_D at its defaults)
    have the parameter counts of ours."""
    folder = reference_folder("CYCLEGAN_REFERENCE")
    with reference(folder, ["--checkpoints_dir", str(tmp_path), "--dataroot", str(tmp_path)]):
        opt = parse_options()
        from models import networks

        counts = [
            count_parameters(networks.define_G(3, 3, 64, net, opt.norm, not opt.no_dropout))
            for net in ("resnet_9blocks", "resnet_6blocks")
        ]
        counts.append(
            count_parameters(networks.define_D(3, 64, opt.netD, opt.n_layers_D, opt.norm))
        )
    assert counts == [11_378_179, 7_837_699, 2_764_737]
    ours = [ResnetGenerator(ngf=64, n_blocks=9), ResnetGenerator(ngf=64, n_blocks=6)]
    ours.append(cyclegan.PatchDiscriminator(ndf=64))
    assert [count_parameters(n) for n in ours] == counts
    p = TrainParams()
    assert (opt.lr, opt.beta1, opt.lambda_A, opt.lambda_identity, opt.pool_size, opt.gan_mode) == (
        p.lr, p.beta1, p.lambda_cycle, p.lambda_identity, p.pool_size, "lsgan",
    )  # fmt: skip
    assert (opt.init_type, opt.init_gain) == ("normal", 0.02)


@pytest.mark.parametrize("batched", [False, True])
def test_cyclegan_parity_one_step(batched, tmp_path):
    """One reference CycleGANModel.optimize_parameters and one of our train_step from the same
    weights and inputs (the pools empty: both return the new fakes): the same 8 losses and the same
    weights of G_A, G_B, D_A, D_B after the step."""
    folder = reference_folder("CYCLEGAN_REFERENCE")
    g = torch.Generator().manual_seed(7)
    real_A, real_B = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    argv = ["--checkpoints_dir", str(tmp_path), "--dataroot", str(tmp_path), "--ngf", "8",
            "--ndf", "8", "--netG", "resnet_6blocks", "--crop_size", "32"]  # fmt: skip
    with reference(folder, argv):
        opt = parse_options()
        opt.device = torch.device("cpu")
        from models.cycle_gan_model import CycleGANModel

        torch.manual_seed(0)
        ref = CycleGANModel(opt)
        nets = ("G_A", "G_B", "D_A", "D_B")
        before = {n: renamed(getattr(ref, f"net{n}").state_dict()) for n in nets}
        ref.set_input(
            {"A": real_A.clone(), "B": real_B.clone(), "A_paths": ["a"], "B_paths": ["b"]}
        )
        ref.optimize_parameters()
        ref_losses = torch.tensor(
            [float(getattr(ref, f"loss_{n}").detach()) for n in cyclegan.LOSS_NAMES]
        )
        after = {n: renamed(getattr(ref, f"net{n}").state_dict()) for n in nets}

    m = cyclegan.build_models(8, 8, 6, 3, torch.device("cpu"), channels_last=False)
    for name, net in zip(nets, m.nets()):
        net.load_state_dict(before[name])
    opt_G, opt_D = cyclegan.optimizers(m, 0.0002, 0.5, fused=False)
    pools = [ImagePool(50, torch.Generator().manual_seed(0)) for _ in range(2)]
    for pool in pools:
        pool.prepare(1)
    p = TrainParams()
    losses = cyclegan.train_step(
        m, opt_G, opt_D, *pools, real_A, real_B, p.lambda_cycle, p.lambda_identity,
        contextlib.nullcontext, batched,
    )  # fmt: skip
    tol = 1e-5 if batched else 1e-6
    torch.testing.assert_close(losses, ref_losses, rtol=tol, atol=tol)
    for name, net in zip(nets, m.nets()):
        same_step(net, before[name], after[name], f"after {name}", tol)
