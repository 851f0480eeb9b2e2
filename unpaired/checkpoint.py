"""Checkpoint files: atomic writes, safe loads.

`models/checkpoints/epoch_NNN.pt` holds what evaluation and translation need:
    {"format": "unpaired.generators/1", "epoch": int,
     "model": {"ngf": int, "n_blocks": int, "in_channels": 3, "out_channels": 3},
     "G_AB": state_dict, "G_BA": state_dict}
(`models/checkpoints/last.pt` is a superset written by the train stage for resuming.)
Everything in them is tensors, numbers, strings, lists and dicts, so they load with
`torch.load(weights_only=True)`: nothing in a checkpoint file can run code.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from unpaired.cyclegan import ResnetGenerator
from unpaired.errors import UserError
from unpaired.files import atomic_write_bytes

FORMAT = "unpaired.generators/1"


def epoch_files(folder: str | Path) -> dict[int, Path]:
    """{epoch: path} of the `epoch_NNN.pt` files in `folder`, in epoch order."""
    found = {}
    for f in Path(folder).glob("epoch_*.pt"):
        stem = f.stem.split("_", 1)[1]
        if stem.isdigit():
            found[int(stem)] = f
    return dict(sorted(found.items()))


def save(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save through a temp file + fsync + rename: a crash leaves the old file or the new one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


def generators_payload(epoch: int, model: dict[str, int], g_ab: torch.nn.Module,
                       g_ba: torch.nn.Module) -> dict[str, Any]:
    def cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    return {"format": FORMAT, "epoch": int(epoch), "model": dict(model),
            "G_AB": cpu_state(g_ab), "G_BA": cpu_state(g_ba)}


def load_generator(path: str | Path, direction: str = "AtoB", device: str | torch.device = "cpu"
                   ) -> tuple[ResnetGenerator, dict[str, Any]]:
    """The generator for `direction` (AtoB or BtoA) from an epoch/last/best checkpoint, in eval mode."""
    ckpt = load(path, "cpu")
    key = {"AtoB": "G_AB", "BtoA": "G_BA"}.get(direction)
    if key is None:
        raise UserError(f"direction must be AtoB or BtoA, got {direction!r}")
    if not isinstance(ckpt, dict) or key not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not an unpaired generator checkpoint (no {key} / model entries)")
    m = ckpt["model"]
    net = ResnetGenerator(m.get("in_channels", 3), m.get("out_channels", 3), m["ngf"], m["n_blocks"])
    net.load_state_dict(ckpt[key])
    return net.to(device).eval(), ckpt
