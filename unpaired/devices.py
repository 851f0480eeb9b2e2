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
            _fail(key, f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                       f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not torch.backends.mps.is_available():
        _fail(key, "'mps' requested but MPS is not available here; use auto or cpu")
    return torch.device(name)


def bf16_for(device: torch.device, precision: str) -> bool:
    """bf16 autocast: asked for, or `auto` on CUDA (tests/test_accel.py: bf16 loss curves stay well
    within the seed-to-seed noise of fp32 ones on CPU autocast; gpu_check.sh measures CUDA). `auto`
    never picks bf16 on a CPU, with or without native bf16 instructions (see cpu_bf16_native)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


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


def precision_warning(device: torch.device, precision: str, key: str = "train.precision") -> str | None:
    """The one-line warning for bf16 asked for on a CPU without native bf16 (cpu_bf16_native), else None."""
    if device.type == "cpu" and bf16_for(device, precision) and cpu_bf16_native() is False:
        return (f"warning: params.yaml: {key}: bf16 on a CPU without native bf16 instructions (none of "
                f"{', '.join(sorted(NATIVE_BF16_FLAGS))} in /proc/cpuinfo) runs emulated, about 10x slower "
                f"than fp32; use auto or fp32")
    return None


def autocast_for(device: torch.device, precision: str):
    """A no-argument context manager factory: bf16 autocast per bf16_for, else a null context."""
    import torch
    if not bf16_for(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
