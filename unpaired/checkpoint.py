"""Checkpoint files: atomic writes, verified safe loads.

`models/checkpoints/epoch_NNN.pt` holds what evaluation and translation need:
    {"format": "unpaired.generators/1", "epoch": int,
     "model": {"ngf": int, "n_blocks": int, "in_channels": 3, "out_channels": 3,
               ["antialias": true,] ["kind": "cut" | "fastcut"]},
     "G_AB": state_dict, "G_BA": state_dict, "sha256": str}
A one-directional model (CUT, FastCUT: "kind" names it) has no "G_BA": its generator maps A→B only.
(`models/checkpoints/last.pt` is a superset written by the train stage for resuming.)
Everything in them is tensors, numbers, strings, lists and dicts, so they load with
`torch.load(weights_only=True)`: nothing in a checkpoint file can run code.

Verification: `save` stores under "sha256" a digest of the whole content (every value, every
tensor's dtype, shape and bytes; `content_digest`), and `load` recomputes it, so a file damaged
after it was written (zeroed blocks, a bad copy) is refused instead of being used. torch's zip
reader does not check the zip CRCs, so a file without a digest (written by an older version or
another program) has its zip CRCs checked with `zipfile` instead.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from unpaired.errors import UserError
from unpaired.files import atomic_write_bytes
from unpaired.models.networks import ResnetGenerator

FORMAT = "unpaired.generators/1"
DIGEST = "sha256"  # the key under which `save` stores `content_digest` of the rest
REWRITE = "delete it and re-run the stage that wrote it"


class CheckpointError(UserError):
    """A file that `load` cannot use. str(err): one line with what to do; `problem`: the same line
    without the advice, for callers that act on it themselves (the train stage's resume)."""

    def __init__(self, path: Path, problem: str, advice: str):
        self.problem = f"{path}: {problem}"
        super().__init__(f"{self.problem}; {advice}")


def epoch_files(folder: str | Path) -> dict[int, Path]:
    """{epoch: path} of the `epoch_NNN.pt` files in `folder`, in epoch order."""
    found = {}
    for f in Path(folder).glob("epoch_*.pt"):
        stem = f.stem.split("_", 1)[1]
        if stem.isdigit():
            found[int(stem)] = f
    return dict(sorted(found.items()))


def _feed(h: Any, obj: Any) -> None:
    # A type tag and a length before each value, so that different structures never feed the same bytes.
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)};".encode() + data)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint: cannot digest a {type(obj).__name__}")


def content_digest(obj: Any) -> str:
    """Hex SHA-256 of a checkpoint's content: dicts (keys in sorted order), lists, tuples, strings,
    numbers, None, and tensors (dtype, shape and raw bytes, on the CPU). Independent of how torch
    lays the file out, so it checks what `torch.load` returns."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save of `obj` plus its content digest under "sha256", through a temp file + fsync +
    rename: a crash leaves the old file or the new one."""
    content = {k: v for k, v in obj.items() if k != DIGEST}
    content[DIGEST] = content_digest(content)
    buf = io.BytesIO()
    torch.save(content, buf)
    atomic_write_bytes(path, buf.getvalue())


def _check_zip(path: Path) -> None:
    """Refuse a file that is not a zip archive (torch's format) or whose zip CRCs do not match."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            path,
            "not a checkpoint, or a truncated one (a PyTorch checkpoint is a "
            "complete zip archive, this file is not)",
            "pass a models/checkpoints/"
            "epoch_NNN.pt or models/best/generators.pt file written by the train stage",
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(path, f"damaged checkpoint ({err})", REWRITE) from None
    if bad is not None:
        raise CheckpointError(path, f"damaged checkpoint (CRC mismatch in {bad})", REWRITE)


def load(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The verified content of a checkpoint written by `save` (or, without the digest check, any
    zip-format torch file of plain tensors, numbers and strings). Raises CheckpointError (one line)
    when the file is not a checkpoint, is damaged, or holds other objects (refused, never run), and
    UserError when it is missing."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise UserError(
                f"{path}: a folder, not a checkpoint file; pass a file in it, e.g. "
                f"models/best/generators.pt or models/checkpoints/epoch_NNN.pt"
            )
        raise UserError(f"{path}: checkpoint not found")
    _check_zip(path)  # cheap compared with the load; torch itself skips the CRCs
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message here advises weights_only=False, which would let the file run code: never show it.
        raise CheckpointError(
            path,
            "not an unpaired checkpoint (it holds objects other than tensors, numbers "
            "and strings, which are refused because loading them could run code)",
            "pass a checkpoint written by the train stage",
        ) from None
    except Exception as err:  # torch raises several types for damaged or foreign files
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in detail:
            detail = type(err).__name__
        raise CheckpointError(path, f"not a readable checkpoint ({detail})", REWRITE) from None
    if isinstance(obj, dict) and DIGEST in obj:
        stored = obj.pop(DIGEST)
        if content_digest(obj) != stored:
            raise CheckpointError(
                path,
                "damaged checkpoint (its content does not match the sha256 stored in it)",
                REWRITE,
            )
    return obj


def generators_payload(
    epoch: int,
    model: dict[str, Any],
    g_ab: torch.nn.Module,
    g_ba: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """An epoch file's content: `model` (the generators' settings), G_AB's and (when given) G_BA's
    weights as contiguous CPU tensors."""

    def cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()
        }

    payload = {"format": FORMAT, "epoch": int(epoch), "model": dict(model), "G_AB": cpu_state(g_ab)}
    if g_ba is not None:
        payload["G_BA"] = cpu_state(g_ba)
    return payload


def directions(ckpt: dict[str, Any]) -> tuple[str, ...]:
    """The directions a loaded generator checkpoint holds: ("AtoB", "BtoA") or ("AtoB",)."""
    return tuple(d for d, key in (("AtoB", "G_AB"), ("BtoA", "G_BA")) if key in ckpt)


def kind(ckpt: dict[str, Any]) -> str:
    """The model that wrote a loaded checkpoint: its model settings' "kind", else cyclegan."""
    m = ckpt.get("model")
    return m.get("kind", "cyclegan") if isinstance(m, dict) else "cyclegan"


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]


def load_generator(
    path: str | Path, direction: str = "AtoB", device: str | torch.device = "cpu"
) -> tuple[ResnetGenerator, dict[str, Any]]:
    """The generator for `direction` (AtoB or BtoA) from an epoch/last/best checkpoint, in eval mode.
    Raises UserError (one line) for a file that is not such a checkpoint, is damaged, whose model
    settings do not fit its weights, or whose weights are not finite (a diverged run)."""
    ckpt = load(path, "cpu")
    key = {"AtoB": "G_AB", "BtoA": "G_BA"}.get(direction)
    if key is None:
        raise UserError(f"direction must be AtoB or BtoA, got {direction!r}")
    if key == "G_BA" and isinstance(ckpt, dict) and "G_AB" in ckpt and key not in ckpt:
        raise UserError(
            f"{path}: a {kind(ckpt)} checkpoint has one generator, A→B: --direction BtoA is not "
            f"available (train train.model: cyclegan for both directions)"
        )
    return _generator(ckpt, key, path, device), ckpt


def load_generators(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[ResnetGenerator, ResnetGenerator | None, dict[str, Any]]:
    """(G_A, G_B, checkpoint): every direction from one read and verification of the file (evaluate
    uses both); G_B is None for a one-directional checkpoint (CUT). Raises UserError as
    load_generator does."""
    ckpt = load(path, "cpu")
    G_A = _generator(ckpt, "G_AB", path, device)
    G_B = _generator(ckpt, "G_BA", path, device) if "BtoA" in directions(ckpt) else None
    return G_A, G_B, ckpt


def _generator(
    ckpt: Any, key: str, path: str | Path, device: str | torch.device
) -> ResnetGenerator:
    """The generator stored under `key` (G_AB or G_BA) of a loaded checkpoint, checked (see load_generator)."""
    if not isinstance(ckpt, dict) or key not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not an unpaired generator checkpoint (no {key} / model entries)")
    m = ckpt["model"]
    missing = [k for k in ("ngf", "n_blocks") if not isinstance(m, dict) or k not in m]
    if missing:
        raise UserError(
            f"{path}: the model settings lack {', '.join(missing)}; the file was edited or "
            f"written by another program: use a checkpoint written by the train stage"
        )
    bad = non_finite(ckpt[key])
    if bad:
        raise UserError(
            f"{path}: the {key} weights are not finite (NaN or inf in {bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run that wrote it "
            f"diverged; retrain with a lower params.yaml: train.lr"
        )
    net = ResnetGenerator(
        m.get("in_channels", 3),
        m.get("out_channels", 3),
        m["ngf"],
        m["n_blocks"],
        antialias=bool(m.get("antialias", False)),
    )
    try:
        net.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).replace("\n", " ").replace("\t", "")
        raise UserError(
            f"{path}: the {key} weights do not fit the stored model settings (ngf={m['ngf']}, "
            f"n_blocks={m['n_blocks']}): {first[:200]}; the file was edited or damaged"
        ) from None
    return net.to(device).eval()
