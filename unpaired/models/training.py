"""What every model's training shares: the `train` params (TrainParams), the interface a model offers
the shared training code (Model; unpaired/models/cyclegan.py's CycleGAN and unpaired/models/cut.py's
CUT are the two), and the wrappers
around a model's modules: the memory format (train.memory_format: channels-last only when asked for
and where the device computes it right), DistributedDataParallel and torch.compile with a
persistent cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import nn

from unpaired import params, threads
from unpaired.devices import check_device
from unpaired.models.networks import generator_depth

CompileMode = Literal["default", "reduce-overhead"]
COMPILE_MODES = get_args(CompileMode)


MemoryFormat = Literal["auto", "channels_last", "contiguous"]
DataPlace = Literal["auto", "device", "host", "disk"]
DATA_PLACES = get_args(DataPlace)  # train.data_device; see unpaired.models.feeding.place_images
ModelName = Literal["cyclegan", "cut", "fastcut"]
Auto = Literal["auto"]

# Keys one model uses and the other does not: set to other than their default for the other model,
# they are refused in one line (never silently ignored).
CYCLEGAN_ONLY = ("lambda_cycle", "lambda_identity", "pool_size")
CUT_ONLY = (
    "lambda_gan",
    "lambda_nce",
    "nce_idt",
    "nce_layers",
    "num_patches",
    "netF_nc",
    "nce_T",
    "flip_equivariance",
)
# What `auto` resolves to per train.model (TrainParams.resolved): the CUT reference's
# models/cut_model.py modify_commandline_options, --CUT_mode CUT vs FastCUT, and its
# options/base_options.py --no_antialias / --no_antialias_up (CycleGAN's reference has neither).
AUTO = {
    "lambda_nce": {"cut": 1.0, "fastcut": 10.0},
    "nce_idt": {"cut": True, "fastcut": False},
    "flip_equivariance": {"cut": False, "fastcut": True},
    "antialias": {"cyclegan": False, "cut": True, "fastcut": True},
}


@dataclass(frozen=True)
class TrainParams(params.Params):
    #: cyclegan (Zhu et al. 2017: two generators, A↔B), cut or fastcut (Park et al. 2020: one
    #: generator, A→B, PatchNCE); each `auto` key below takes that model's reference default. The
    #: references' schedules: CycleGAN 100 + 100 epochs, CUT 200 + 200 and FastCUT 150 + 50
    #: (models/cut_model.py --CUT_mode, options/train_options.py --n_epochs / --n_epochs_decay);
    #: train.epochs and train.epochs_decay are yours to set. Adam (lr, β) and LSGAN are the same in
    #: all three references
    model: ModelName = "cyclegan"
    epochs: int = 3  # epochs at the initial learning rate (paper: 100; CUT 200, FastCUT 150)
    #: then epochs of linear decay towards 0 (paper: 100; CUT 200, FastCUT 50)
    epochs_decay: int = 3
    lr: float = 0.0002  # Adam's learning rate (paper: 0.0002)
    beta1: float = 0.5  # Adam's β1 (paper: 0.5; β2 is 0.999)
    #: cyclegan: λ for each cycle loss, A→B→A and B→A→B (paper: 10)
    lambda_cycle: float = 10.0
    #: cyclegan: identity loss weight, × lambda_cycle (paper: 0.5; 0 turns it off)
    lambda_identity: float = 0.5
    #: cyclegan: generated images kept per direction for the discriminators (paper: 50; 0: no
    #: pool). CUT keeps none (models/cut_model.py: pool_size=0)
    pool_size: int = 50
    #: cut/fastcut: λ_GAN, the GAN loss weight of G (models/cut_model.py --lambda_GAN: 1)
    lambda_gan: float = 1.0
    #: cut/fastcut: λ_NCE, the PatchNCE loss weight; auto: 1 for cut, 10 for fastcut
    #: (models/cut_model.py --lambda_NCE and --CUT_mode)
    lambda_nce: float | Auto = "auto"
    #: cut/fastcut: the identity PatchNCE loss NCE(G(B), B) too; auto: true for cut, false for
    #: fastcut (models/cut_model.py --nce_idt)
    nce_idt: bool | Auto = "auto"
    #: cut/fastcut: the layers of G whose features PatchNCE compares, as indices into G's layers
    #: (models/cut_model.py --nce_layers 0,4,8,12,16: the input, both downsampling convs, the
    #: 1st and 5th residual block with antialias)
    nce_layers: tuple[int, ...] = (0, 4, 8, 12, 16)
    #: cut/fastcut: feature positions sampled per layer and image (models/cut_model.py
    #: --num_patches 256)
    num_patches: int = 256
    #: cut/fastcut: width of F, the MLP head over each layer's features (models/cut_model.py
    #: --netF mlp_sample --netF_nc 256)
    netF_nc: int = 256
    #: cut/fastcut: τ, the PatchNCE temperature (models/cut_model.py --nce_T 0.07)
    nce_T: float = 0.07
    #: cut/fastcut: flip both G's input and its features at random, half of the steps; auto: false
    #: for cut, true for fastcut (models/cut_model.py --flip_equivariance)
    flip_equivariance: bool | Auto = "auto"
    #: blurred (antialiased) down- and upsampling in G and D; auto: true for cut and fastcut
    #: (options/base_options.py --no_antialias, --no_antialias_up off), false for cyclegan (its
    #: reference has none)
    antialias: bool | Auto = "auto"
    ngf: int = 16  # generator width (paper: 64)
    ndf: int = 32  # discriminator width (paper: 64)
    n_blocks: int = 6  # residual blocks (paper: 9 at 256 px, 6 below)
    n_layers: int = 3  # discriminator conv layers (3 = 70×70 PatchGAN)
    load_size: int = 72  # resize to this (paper: 286) ...
    crop_size: int = 64  # ... then random crop (paper: 256); a multiple of 4, >= 16
    no_flip: bool = False  # true: no random horizontal flips
    batch_size: int = 1  # images per step per process (paper: 1)
    save_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    samples: int = 4  # test images per direction in the per-epoch sample image
    seed: int = 0  # weights, crops, flips, pool and patch draws
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    #: auto (bf16 on CUDA at compute capability >= 8.0, else fp32), bf16, fp32 (fp32 allows TF32 on
    #: CUDA)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    #: true: deterministic kernels on CUDA too (torch's deterministic algorithms, no cuDNN
    #: autotuning), for runs repeatable on one GPU and software stack; slower by an unmeasured
    #: amount. CPU runs always use them
    deterministic: bool = False
    #: false, default or reduce-overhead: torch.compile (true = default; worth it on CUDA for long
    #: runs)
    compile: bool | CompileMode = False
    #: a step's independent network passes as one batch (false: the reference order, pass by pass;
    #: the same maths)
    batched_passes: bool = True
    #: processes on this node via torchrun: one per GPU (CPU: at most one per core)
    devices: int = 1
    #: with devices > 1: lr × 1, × world size or × √(world size)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    #: the networks' memory format: auto (contiguous: channels-last is not measured faster for these
    #: networks), channels_last (refused where it computes wrong, e.g. the CPU) or contiguous
    memory_format: MemoryFormat = "auto"
    #: where the training images live: auto, device, host (CUDA: pinned) or disk (read one batch
    #: ahead)
    data_device: DataPlace = "auto"
    #: CPU threads: auto (every CPU: the machine decides, never its load) or N; OpenMP threads wait
    #: passively when other work holds the CPUs at start, else spin
    threads: int | str = "auto"

    BOUNDS = {  # generous: the paper trains 100 + 100 epochs at 256 px, ngf = ndf = 64, 9 blocks
        "epochs": params.Bound(
            10_000, "each epoch adds an epoch file, a sample grid and a log row"
        ),
        "epochs_decay": params.Bound(
            10_000, "each epoch adds an epoch file, a sample grid and a log row"
        ),
        "lr": params.Bound(
            1.0, "Adam moves each weight by about lr per step; the paper uses 0.0002"
        ),
        "beta1": params.Bound(1, "Adam's momentum: a decay rate", 0, below=True),
        "lambda_cycle": params.Bound(
            1_000, "past it the GAN loss no longer counts; the paper uses 10"
        ),
        "lambda_identity": params.Bound(100, "× lambda_cycle; the paper uses 0.5"),
        "lambda_gan": params.Bound(1_000, "CUT's reference uses 1"),
        "lambda_nce": params.Bound(1_000, "CUT's reference uses 1 (FastCUT 10)"),
        "nce_layers": params.Bound(1_000, "indices into G's layers (tens of them)"),
        "num_patches": params.Bound(
            65_536, "each layer's PatchNCE logits grow with its square; the reference uses 256"
        ),
        "netF_nc": params.Bound(4_096, "F's weights grow with its square; the reference uses 256"),
        "nce_T": params.Bound(
            100, "a temperature dividing cosine similarities; the reference uses 0.07"
        ),
        "pool_size": params.Bound(
            10_000, "fake images kept per direction on the training device; the paper keeps 50"
        ),
        "ngf": params.Bound(
            256, "weights grow with its square: 256 is ~180 M per generator at 9 blocks"
        ),
        "ndf": params.Bound(256, "weights grow with its square; the paper uses 64"),
        "n_blocks": params.Bound(64, "residual blocks; the paper uses 9"),
        "n_layers": params.Bound(8, "crop_size must be >= 3 × 2^n_layers, and crop_size <= 1024"),
        "load_size": params.Bound(
            2048, "every training image is resized to load_size² before the crop"
        ),
        "crop_size": params.Bound(
            1024,
            "activations grow with its square: a step at 1024 px "
            "needs 16× the memory of one at 256",
        ),
        "batch_size": params.Bound(1024, "images per step per process; the paper uses 1"),
        "save_every": params.Bound(
            20_000, "epochs; past epochs + epochs_decay only the last is saved"
        ),
        "samples": params.SAMPLES,
        "seed": params.SEED,
        "devices": params.Bound(64, "processes on one node, each with its own copy of the models"),
        "threads": params.THREADS,
    }
    POOL_BYTES = 4 * 2**30  # both pools together, fp32 on the training device

    def validate(self, prefix: str) -> None:
        c = params.check
        for key in ("epochs", "ngf", "ndf", "n_blocks", "n_layers", "batch_size", "save_every"):
            c(
                getattr(self, key) >= (0 if key == "n_blocks" else 1),
                f"{prefix}.{key}",
                f"must be >= {0 if key == 'n_blocks' else 1}, got {getattr(self, key)}",
            )
        c(
            self.epochs_decay >= 0,
            f"{prefix}.epochs_decay",
            f"must be >= 0, got {self.epochs_decay}",
        )
        c(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        c(0 <= self.beta1 < 1, f"{prefix}.beta1", f"must be in [0, 1), got {self.beta1}")
        c(
            self.lambda_cycle >= 0 and self.lambda_identity >= 0,
            f"{prefix}.lambda_cycle",
            "lambda_cycle and lambda_identity must be >= 0",
        )
        c(self.pool_size >= 0, f"{prefix}.pool_size", f"must be >= 0, got {self.pool_size}")
        c(self.samples >= 0, f"{prefix}.samples", f"must be >= 0, got {self.samples}")
        pool = 2 * self.pool_size * 3 * self.crop_size**2 * 4  # both directions, fp32 at most
        c(
            pool <= self.POOL_BYTES,
            f"{prefix}.pool_size",
            f"{self.pool_size:,} images per direction at crop_size {self.crop_size} need {pool / 2**30:.1f} "
            f"GiB on the training device, over {self.POOL_BYTES // 2**30} GiB; use at most "
            f"{self.POOL_BYTES // (24 * self.crop_size**2):,} (the paper keeps 50)",
        )
        c(
            self.crop_size >= 16 and self.crop_size % 4 == 0,
            f"{prefix}.crop_size",
            f"must be a multiple of 4 and >= 16 (the generator downsamples twice), got {self.crop_size}",
        )
        c(
            self.crop_size <= self.load_size,
            f"{prefix}.crop_size",
            f"must be <= {prefix}.load_size ({self.load_size}), got {self.crop_size}",
        )
        smallest = 3 * 2**self.n_layers  # the PatchGAN's last feature map must stay >= 2×2
        c(
            self.crop_size >= smallest,
            f"{prefix}.crop_size",
            f"must be >= {smallest} for a discriminator with n_layers={self.n_layers}, got {self.crop_size}",
        )
        check_device(self.device, f"{prefix}.device")
        threads.check(self.threads, f"{prefix}.threads")
        c(self.devices >= 1, f"{prefix}.devices", f"must be >= 1, got {self.devices}")
        self._validate_model(prefix)

    def _validate_model(self, prefix: str) -> None:
        """Keys of the other model left at their defaults; CUT's own keys in range."""
        c = params.check
        cut = self.model != "cyclegan"
        defaults = TrainParams()
        for key in CUT_ONLY if not cut else CYCLEGAN_ONLY:
            c(
                getattr(self, key) == getattr(defaults, key),
                f"{prefix}.{key}",
                f"is not used by {prefix}.model {self.model} (only by "
                f"{'cyclegan' if cut else 'cut and fastcut'}); remove it or set it back to "
                f"{getattr(defaults, key)!r}",
            )
        if not cut:
            return
        c(self.lambda_gan >= 0, f"{prefix}.lambda_gan", f"must be >= 0, got {self.lambda_gan}")
        nce = self.resolved("lambda_nce")
        c(nce > 0, f"{prefix}.lambda_nce", f"must be > 0 (F learns from it alone), got {nce}")
        c(self.num_patches >= 1, f"{prefix}.num_patches", f"must be >= 1, got {self.num_patches}")
        c(self.netF_nc >= 1, f"{prefix}.netF_nc", f"must be >= 1, got {self.netF_nc}")
        c(self.nce_T > 0, f"{prefix}.nce_T", f"must be > 0, got {self.nce_T}")
        depth = generator_depth(self.n_blocks, self.resolved("antialias"))
        layers = self.nce_layers
        c(
            len(layers) >= 1
            and list(layers) == sorted(set(layers))
            and layers[0] >= 0
            and layers[-1] < depth,
            f"{prefix}.nce_layers",
            f"must be increasing indices of G's {depth} layers (0 to {depth - 1} at n_blocks "
            f"{self.n_blocks}), got {list(layers)}",
        )

    def resolved(self, key: str) -> Any:
        """train.`key` with `auto` resolved for train.model (AUTO: the references' defaults)."""
        value = getattr(self, key)
        return AUTO[key][self.model] if value == "auto" else value

    @property
    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode."""
        return "default" if self.compile is True else (self.compile or None)

    def scaled_lr(self, world_size: int) -> float:
        """train.lr under train.lr_scaling for an effective batch of batch_size × world_size."""
        return (
            self.lr * {"none": 1.0, "linear": world_size, "sqrt": world_size**0.5}[self.lr_scaling]
        )


class Model(Protocol):
    """What the shared training code (unpaired/models/state.py, loop.py, live.py) needs of a model;
    unpaired.models.cyclegan.CycleGAN is one. A model is built as
    `Model(p, device, world_size, g_rank, channels_last)` (TrainParams, the training device, the
    number of processes, this rank's own random stream, the memory format of its networks) once
    torch's global seed is set: its weights' initialisation draws from that stream.

    Its class attributes name its parts, as last.pt stores them: `LOSS_NAMES` the losses `step`
    returns, in order (the log's metric names); `NETS` the networks under last.pt's "nets";
    `OPTIMIZERS` the suffix X of each optimizer, stored as opt_X with its lr schedule as sched_X;
    `RANK_STATE` the keys of `rank_state()` (rank 0's at last.pt's top level, the other ranks'
    under "other_ranks"); `GENERATORS` the generators its epoch files hold (G_AB: A→B, G_BA: B→A;
    a one-directional model has G_AB alone)."""

    LOSS_NAMES: ClassVar[tuple[str, ...]]
    GENERATORS: ClassVar[tuple[str, ...]]
    NETS: ClassVar[tuple[str, ...]]
    OPTIMIZERS: ClassVar[tuple[str, ...]]
    RANK_STATE: ClassVar[tuple[str, ...]]
    nets: dict[str, nn.Module]  # the raw networks, in NETS order
    optimizers: dict[str, torch.optim.Optimizer]  # in OPTIMIZERS order

    def epoch_file(self, epoch: int) -> dict[str, Any]:
        """The epoch file's content: the generators in checkpoint.generators_payload's format."""

    def start_epoch(self, images: int) -> None:
        """Before an epoch of `images` images on this rank: training mode, and the epoch's own
        randomness drawn ahead (CycleGAN: its pools')."""

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor, autocast) -> torch.Tensor:
        """One optimisation step on B×3×H×W batches in [-1, 1]; the LOSS_NAMES losses as a detached
        float32 device tensor (no host sync)."""

    def rank_state(self) -> dict[str, Any]:
        """This rank's own state (RANK_STATE keys), CPU tensors."""

    def load_rank_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore what `rank_state` returned."""

    def distribute(self, device: torch.device) -> None:
        """Wrap what a step calls in DistributedDataParallel (process group already joined)."""

    def compile(self, mode: str) -> None:
        """torch.compile what a step calls (`mode`: one of COMPILE_MODES)."""

    def sample_rows(
        self, real_A: torch.Tensor, real_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample grid's rows for fixed test images (samples.grid): N×3×3×H×W per direction."""


def channels_last_ok(device: torch.device) -> bool:
    """Whether `device` computes instance norm's input gradient right when the incoming gradient is
    channels-last, at batch 1 and 2 (measured wrong on CPU at batch 1 in torch 2.15: the error was
    larger than the gradient). A few small ops against a float64 contiguous computation on the CPU;
    the train stage uses channels-last only where this holds. tests/test_accel.py checks a whole
    step's gradients in every memory format and batch arrangement."""
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        x = torch.randn(batch, 8, 6, 6, generator=g, dtype=torch.float64)
        up = torch.randn(batch, 8, 6, 6, generator=g, dtype=torch.float64)
        x64 = x.clone().requires_grad_(True)
        F.instance_norm(x64).backward(up)
        xd = x.float().to(device).requires_grad_(True)
        F.instance_norm(xd).backward(
            up.float().to(device).contiguous(memory_format=torch.channels_last)
        )
        err = (xd.grad.double().cpu() - x64.grad).abs().max() / x64.grad.abs().max()
        if not err < 1e-3:
            return False
    return True


def use_channels_last(setting: str, device: torch.device, key: str = "train.memory_format") -> bool:
    """Whether the networks (and the feeders' batches) are channels-last under train.memory_format =
    `setting` on `device`. `auto` and `contiguous`: never. Channels-last has not been measured faster
    for these networks on any device here, and instance norm returns contiguous (NCHW) tensors
    whatever its input, so each conv/norm pair may add two layout changes; `auto` stays contiguous
    until a measurement says otherwise (benchmarks/gpu_check.sh measures both on CUDA).
    `channels_last`: where channels_last_ok holds, else a one-line ParamsError naming `key`."""
    if setting != "channels_last":
        return False
    if not channels_last_ok(device):
        params.fail(
            key,
            f"channels_last computes instance norm's input gradient wrong on {device} "
            f"(training.channels_last_ok); use auto or contiguous",
        )
    return True


def compile_cache_dir() -> Path:
    """Where torch.compile's caches (inductor's FX graph and AOT autograd caches, both on by default)
    persist: $XDG_CACHE_HOME/unpaired/torchinductor, else ~/.cache/unpaired/torchinductor. Inductor's
    own default, /tmp/torchinductor_<user>, goes with every reboot or fresh /tmp, and a cold compile
    of the CPU step takes minutes; a warm one seconds (README, "Compile")."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unpaired" / "torchinductor"


def adam_options(lr: float, beta1: float, fused: bool) -> dict[str, Any]:
    """torch.optim.Adam's keyword arguments for both models: lr, betas (beta1, 0.999) as the
    references, and the implementation: `fused` (CUDA: one kernel per step) or else foreach, the
    multi-tensor implementation. On the CPU torch's default is its per-tensor loop; foreach gives
    the same numbers bit for bit (tests/test_train.py) with fewer calls per step."""
    return {"lr": lr, "betas": (beta1, 0.999), "fused" if fused else "foreach": True}


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel (process group already initialised): gradients are
    averaged over ranks in the backward; rank 0's weights are broadcast at wrap time."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def compiled(module: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """torch.compile of `module` (`mode`: "default" or "reduce-overhead", as torch names them;
    reduce-overhead adds CUDA graphs on CUDA). Inductor's caches go to compile_cache_dir() unless
    TORCHINDUCTOR_CACHE_DIR is set."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    kw = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(module, backend=backend, **kw)
