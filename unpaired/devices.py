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
    within the seed-to-seed noise of fp32 ones on CPU autocast; gpu_check.sh measures CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    """A no-argument context manager factory: bf16 autocast per bf16_for, else a null context."""
    import torch
    if not bf16_for(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
