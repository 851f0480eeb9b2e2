"""Which torch device a device setting means: one validator for every place a user can name one.

The settings are `train.device`, `evaluate.device`, a stylegan source's `domains.<d>.device` (params
keys) and the CLI's `--device` flag. Each accepts the same values, DEVICES. A bad value is one line
with the right prefix: `params.yaml: evaluate.device: ...` for a params key, `--device: ...` for a
flag (any `key` starting with "--" is a flag).

`check_device` looks only at the spelling (no torch import: the params dataclasses call it while
validating); `resolve_device` also checks that the device exists on this machine.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from unpaired import params
from unpaired.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_SPELLING = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def _fail(key: str, message: str) -> NoReturn:
    if key.startswith("--"):
        raise UserError(f"{key}: {message}")
    params.fail(key, message)


def check_device(name: object, key: str) -> None:
    """Raise a one-line error unless `name` is one of DEVICES (spelling only; availability is
    resolve_device's). `key` is the params key ("evaluate.device") or the flag ("--device")."""
    if not isinstance(name, str) or not _SPELLING.fullmatch(name):
        _fail(key, f"unknown device {name!r}; use {DEVICES}")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The torch.device for `name` (one of DEVICES); `auto` is cuda, then mps, then cpu.
    Raises a one-line error (prefixed by `key`) for a bad spelling or a device this machine lacks."""
    import torch

    check_device(name, key)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            _fail(key, f"{name!r} requested but CUDA is not available here; use auto or cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            _fail(
                key,
                f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})",
            )
    if name == "mps" and not torch.backends.mps.is_available():
        _fail(key, "'mps' requested but MPS is not available here; use auto or cpu")
    return torch.device(name)


# bf16 arithmetic in hardware on CUDA cards from compute capability 8.0 (Ampere: A100, RTX 30xx; then
# Ada, Hopper, Blackwell). Older cards (T4 7.5, V100 7.0, P100 6.0) have none: torch runs bf16 there
# by emulation, and torch.cuda.is_bf16_supported() still answers True on them (it counts emulation).
BF16_NATIVE_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class PrecisionChoice:
    """What `train.precision` means on one device: `bf16` autocast or not; `why`, the log line's text
    (which precision and why, e.g. "precision: bf16 autocast: train.precision auto on CUDA compute
    capability 9.0 (native bf16 from 8.0)"); `warning`, one line for stderr or None."""

    bf16: bool
    why: str
    warning: str | None = None


def precision_rule(
    device_type: str,
    capability: tuple[int, int] | None,
    precision: str,
    cpu_native: bool | None = None,
    key: str = "train.precision",
) -> PrecisionChoice:
    """The precision rule, a pure function (tests/test_precision.py runs it for every card on the CPU).

    device_type: a torch.device's type ("cuda", "cpu", "mps"); capability: the CUDA card's compute
    capability (major, minor) as torch.cuda.get_device_capability gives it (None: unknown, or not
    CUDA); precision: `train.precision` (auto, bf16 or fp32); cpu_native: whether the CPU has native
    bf16 instructions (cpu_bf16_native; None: unknown). `key` names the setting in the lines.

    `auto` is bf16 autocast only on CUDA at compute capability >= BF16_NATIVE_CAPABILITY, else fp32:
    never on a CPU (different maths from the reference's fp32 step; README "Train speed"), never on an
    older card (emulated). `bf16` is bf16 everywhere, with a warning where it runs emulated: a CUDA
    card below 8.0 or a CPU without native bf16. `fp32` is fp32 (TF32 on cards of 8.0 and newer)."""
    cuda = device_type == "cuda"
    native = cuda and capability is not None and tuple(capability) >= BF16_NATIVE_CAPABILITY
    card = (
        f"CUDA compute capability {capability[0]}.{capability[1]}"
        if cuda and capability is not None
        else "CUDA, compute capability unknown"
        if cuda
        else device_type.upper()
    )
    need = f"native bf16 from {BF16_NATIVE_CAPABILITY[0]}.{BF16_NATIVE_CAPABILITY[1]}"
    fp32 = "fp32 (TF32 matmuls and convolutions)" if native else "fp32"
    if precision == "fp32":
        return PrecisionChoice(False, f"precision: {fp32}: {key} fp32")
    if precision == "auto":
        if native:
            return PrecisionChoice(True, f"precision: bf16 autocast: {key} auto on {card} ({need})")
        why = (
            f"{card} has no native bf16 ({need}; torch would emulate it)"
            if cuda
            else "bf16 only on CUDA cards with native bf16, never on a CPU"
            if device_type == "cpu"
            else "bf16 only on CUDA cards with native bf16"
        )
        return PrecisionChoice(False, f"precision: {fp32}: {key} auto on {card}: {why}")
    warning = None
    if cuda and not native:
        warning = (
            f"warning: params.yaml: {key}: bf16 on {card}, which has no native bf16 ({need}): torch "
            f"emulates it, slower than fp32; use auto or fp32"
        )
    elif device_type == "cpu" and cpu_native is False:
        warning = (
            f"warning: params.yaml: {key}: bf16 on a CPU without native bf16 instructions (none of "
            f"{', '.join(sorted(NATIVE_BF16_FLAGS))} in /proc/cpuinfo) runs emulated, about 10x slower "
            f"than fp32; use auto or fp32"
        )
    return PrecisionChoice(
        True,
        f"precision: bf16 autocast: {key} bf16 on {card}" + (" (emulated)" if warning else ""),
        warning,
    )


def precision_for(
    device: torch.device, precision: str, key: str = "train.precision"
) -> PrecisionChoice:
    """precision_rule for this machine's `device`: its CUDA compute capability, or its CPU's native
    bf16 (cpu_bf16_native). The stage prints `.why` once (rank 0) and `.warning` when there is one."""
    capability = None
    if device.type == "cuda":
        import torch

        capability = tuple(torch.cuda.get_device_capability(device))
    cpu_native = cpu_bf16_native() if device.type == "cpu" and precision == "bf16" else None
    return precision_rule(device.type, capability, precision, cpu_native, key)


def bf16_for(device: torch.device, precision: str) -> bool:
    """bf16 autocast for `train.precision` on `device`, by precision_rule (tests/test_accel.py: bf16
    loss curves stay well within the seed-to-seed noise of fp32 ones on CPU autocast; gpu_check.sh
    measures CUDA)."""
    return precision_for(device, precision).bf16


# CPU feature flags that compute bf16 natively, as Linux names them in /proc/cpuinfo: x86's AVX-512
# BF16 and AMX BF16 (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later), Arm's BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_bf16_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has native bf16 instructions: any of NATIVE_BF16_FLAGS among the `flags`
    (x86) or `Features` (Arm) of /proc/cpuinfo (or the given text). None where that file is absent
    (not Linux): unknown. torch has no public query for it; without those instructions bf16 runs
    emulated, measured 10× slower than fp32 on an AVX2-only CPU."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def precision_warning(
    device: torch.device, precision: str, key: str = "train.precision"
) -> str | None:
    """The one-line warning for bf16 asked for where it runs emulated (precision_rule: a CUDA card
    below compute capability 8.0, a CPU without native bf16), else None. The stage prints it once."""
    return precision_for(device, precision, key).warning


def autocast_for(device: torch.device, precision: str):
    """A no-argument context manager factory: bf16 autocast per bf16_for, else a null context."""
    import torch

    if not bf16_for(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
