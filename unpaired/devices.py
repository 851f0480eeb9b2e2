"""Which torch device a `device:` params key means."""
from __future__ import annotations

import torch

from unpaired import params


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            params.fail(key, f"{name!r} requested but CUDA is not available here; use auto or cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            params.fail(key, f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not torch.backends.mps.is_available():
        params.fail(key, "'mps' requested but MPS is not available here; use auto or cpu")
    return torch.device(name)
