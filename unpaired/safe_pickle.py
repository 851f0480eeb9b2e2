"""Load official StyleGAN2-ADA network pickles without running anything in them.

The official code (stylegan2-ada-pytorch, `torch_utils/persistence.py`) pickles every network module
as a call `_reconstruct_persistent_obj(meta)`, where `meta` holds the module's Python *source code*
(`module_src`), its class name and its pickled `__dict__` (`state`); loading it with `pickle.load`
executes that source. Here the unpickler resolves only the handful of globals such a pickle needs,
each to a harmless stand-in:

    torch_utils.persistence._reconstruct_persistent_obj → a `Persistent` record (class name + state;
                                                          the source is kept as text, never run)
    torch.storage._load_from_bytes                      → torch.load(..., weights_only=True)
    torch._utils._rebuild_tensor_v2 / _rebuild_parameter → the same torch functions (the ones
                                                          torch's own weights-only loader allows)
    collections.OrderedDict, dnnlib.util.EasyDict (→ dict), numpy array reconstruction, builtins.set

Anything else (`os.system`, `builtins.eval`, a class to instantiate, ...) is refused when the
unpickler meets it, before it is called: `UnsafePickle` names the global and nothing else runs.
The generator's tensors and constructor arguments are then read out of the records and loaded into
the plain-PyTorch generator of sources/stylegan2.py.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unpaired.errors import UserError
from unpaired.sources.stylegan2 import Generator, GeneratorConfig

FORMAT = "unpaired-stylegan2"


class UnsafePickle(UserError):
    """The file references something a network pickle has no business calling."""


class TensorFlowPickle(UserError):
    """A TensorFlow-era network (NVlabs/stylegan2, stylegan2-ada): it pickles `dnnlib.tflib` objects,
    whose weights only TensorFlow 1.x can rebuild. stylegan2-ada-pytorch's legacy.py converts it."""


TF_MODULES = ("dnnlib.tflib", "tensorflow")
CONVERT = (
    "convert it to a PyTorch network with stylegan2-ada-pytorch's legacy.py "
    "(git clone https://github.com/NVlabs/stylegan2-ada-pytorch, then "
    "`python legacy.py --source=THIS_FILE --dest=converted.pkl`; it needs no TensorFlow) "
    "and give converted.pkl"
)


class Persistent:
    """What `_reconstruct_persistent_obj(meta)` built, without building it: the class name, the
    pickled `__dict__` of the module, and its source code as an inert string."""

    def __init__(self, meta: Any):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise pickle.UnpicklingError("persistent object record is not a class record")
        self.class_name = str(meta.get("class_name"))
        self.state = meta.get("state") or {}
        self.module_src = meta.get("module_src", "")

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


def _load_storage(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy reconstruction of a type other than ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy scalar of an object dtype")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _numpy_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec, align=align)
    if dt.hasobject:
        raise pickle.UnpicklingError("numpy object dtype")
    return dt


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): Persistent,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("builtins", "set"): set,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == TF_MODULES[0] or module.startswith(tuple(m + "." for m in TF_MODULES)):
            raise TensorFlowPickle(
                f"a TensorFlow-era StyleGAN2 network (a pickle of {module}.{name} "
                f"objects, from NVlabs/stylegan2 or stylegan2-ada), which this "
                f"loader cannot read; {CONVERT} (nothing in the file was run)"
            )
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refers to {module}.{name}, which a network pickle does not need; "
                f"refused (nothing in the file was run)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("uses persistent ids (a torch.save file?); refused")


def safe_load(path: str | Path) -> Any:
    """Unpickle `path` with only ALLOWED globals. Raises UnsafePickle naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except TensorFlowPickle as err:
        raise TensorFlowPickle(f"{path}: {err}".replace("THIS_FILE", str(path))) from None
    except UnsafePickle as err:
        raise UnsafePickle(f"{path}: {err}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        RuntimeError,
    ) as err:
        raise UserError(
            f"{path}: not a readable network pickle ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def module_tensors(obj: Persistent, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a persistent module record: its _parameters and persistent _buffers, and
    those of its _modules, with dotted names."""
    state = obj.state
    out: dict[str, torch.Tensor] = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Persistent):
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


# Generator(z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs, synthesis_kwargs)
GENERATOR_ARGS = [
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "mapping_kwargs",
    "synthesis_kwargs",
]
MAPPING_KEYS = {"num_layers": "mapping_layers", "lr_multiplier": "mapping_lr_multiplier"}
SYNTHESIS_KEYS = {"channel_base", "channel_max", "num_fp16_res", "conv_clamp", "resample_filter"}
DEFAULTS_WE_MATCH = {
    "architecture": "skip",
    "activation": "lrelu",
    "kernel_size": 3,
    "use_noise": True,
}
# Accepted whatever their value: training-only (w_avg_beta), memory layout (fp16_channels_last), the
# label embedding of conditional networks (refused elsewhere). layer_features must be w_dim (or None).
IGNORED = {"w_avg_beta", "fp16_channels_last", "embed_features"}


def config_from_record(g: Persistent, where: str) -> GeneratorConfig:
    kwargs = dict(zip(GENERATOR_ARGS, g.state.get("_init_args") or ()))
    kwargs.update(g.state.get("_init_kwargs") or {})
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"):
        if key not in kwargs:
            raise UserError(
                f"{where}: the generator record has no {key}; is this a StyleGAN2-ADA pickle?"
            )
        values[key] = int(kwargs[key])
    for group, names in (("mapping_kwargs", MAPPING_KEYS), ("synthesis_kwargs", SYNTHESIS_KEYS)):
        for key, value in dict(kwargs.get(group) or {}).items():
            if key in names:
                values[names[key] if isinstance(names, dict) else key] = value
            elif key in IGNORED or (key == "layer_features" and value in (None, values["w_dim"])):
                extra[key] = value
            elif key in DEFAULTS_WE_MATCH and value == DEFAULTS_WE_MATCH[key]:
                extra[key] = value
            elif key in DEFAULTS_WE_MATCH:
                raise UserError(
                    f"{where}: {group}.{key}={value!r} is not supported (only "
                    f"{DEFAULTS_WE_MATCH[key]!r}: the StyleGAN2 config-f generator)"
                )
            else:
                extra[key] = value
    for key in ("mapping_layers", "channel_base", "channel_max", "num_fp16_res"):
        if key in values:
            values[key] = int(values[key])
    if "mapping_lr_multiplier" in values:
        values["mapping_lr_multiplier"] = float(values["mapping_lr_multiplier"])
    if values.get("conv_clamp") is not None:
        values["conv_clamp"] = float(values["conv_clamp"])
    if "resample_filter" in values:
        values["resample_filter"] = tuple(int(v) for v in values["resample_filter"])
    return GeneratorConfig(**values, extra=extra)


def build(cfg: GeneratorConfig, tensors: dict[str, torch.Tensor], where: str) -> Generator:
    try:
        g = Generator(cfg)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    expected = g.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{where}: not a StyleGAN2 generator this loader knows (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); StyleGAN3 and TF pickles are "
            f"not supported"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{where}: {name} has shape {tuple(t.shape)}, expected "
                f"{tuple(expected[name].shape)}"
            )
    g.load_state_dict({k: v.detach().to(torch.float32) for k, v in tensors.items()})
    return g.eval().requires_grad_(False)


def load_generator(path: str | Path, key: str = "G_ema") -> Generator:
    """The generator in an official network pickle (`key` of its snapshot dict, G_ema by default)
    or in a file written by `save_generator`."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # a torch.save zip file: our own format
        return _load_saved(path)
    obj = safe_load(path)
    if isinstance(obj, dict):
        if key not in obj:
            raise UserError(
                f"{path}: no {key!r} in the pickle (it holds {', '.join(map(str, obj))})"
            )
        obj = obj[key]
    if not isinstance(obj, Persistent) or obj.class_name != "Generator":
        raise UserError(f"{path}: {key} is not a StyleGAN2 Generator record")
    return build(config_from_record(obj, str(path)), module_tensors(obj), str(path))


def save_generator(g: Generator, path: str | Path) -> None:
    """A plain state dict + config, loadable with torch.load(weights_only=True)."""
    cfg = {f.name: getattr(g.cfg, f.name) for f in fields(g.cfg) if f.name != "extra"}
    cfg["resample_filter"] = list(cfg["resample_filter"])
    torch.save({"format": FORMAT, "config": cfg, "state_dict": g.state_dict()}, path)


def _load_saved(path: Path) -> Generator:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure is one line naming the file
        raise UserError(
            f"{path}: cannot load ({type(err).__name__}); expected a StyleGAN2 network "
            f"pickle or a file saved by unpaired"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: a torch file, but not a StyleGAN2 generator saved by unpaired")
    cfg = dict(data["config"])
    cfg["resample_filter"] = tuple(cfg.get("resample_filter", (1, 3, 3, 1)))
    return build(GeneratorConfig(**cfg), data["state_dict"], str(path))
