"""`unpaired export`: a trained generator as an ONNX file.

    unpaired export CHECKPOINT --direction AtoB --format onnx --out FILE|DIR

The exported graph pads and crops as `unpaired translate` does (unpaired/translate.py's
pad_crop_forward, traced), so it takes any H, W >= MIN_SIDE. The argument parsing is unpaired/cli.py's.
"""

# torch is imported inside the function, so that `unpaired --help` answers at once.
from __future__ import annotations

import os
import warnings
from pathlib import Path

from unpaired.translate import pad_crop_forward


def export_onnx(checkpoint_path: str, out: str, direction: str = "AtoB", opset: int = 17) -> Path:
    """The generator as ONNX: input `image` N×3×H×W float32 in [-1, 1], output `translated` of the
    same shape, dynamic N, H and W (any H, W >= MIN_SIDE: the graph reflect-pads to multiples of 4 and
    crops back, as `translate` does). `out` is a file, or a folder (an existing one, or a path ending in
    "/"), which gets `<checkpoint stem>_<direction>.onnx`. Returns the path written."""
    import io

    import torch

    from unpaired.checkpoint import load_generator
    from unpaired.files import atomic_write_bytes

    class PadCrop(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pad_crop_forward(self.net, x)

    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        path = path / f"{Path(checkpoint_path).stem}_{direction}.onnx"
    net, _ = load_generator(checkpoint_path, direction, "cpu")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Notes from the TorchScript exporter that a user cannot act on, each checked to be harmless:
        # it is the legacy exporter (the dynamo one needs onnxscript, not a dependency here);
        # instance norm is exported with train=True, which is what InstanceNorm2d without running
        # stats computes in eval mode too; the tracer sees the size checks of instance norm and pad
        # (not branches: the graph works for every H, W, tests/test_cli.py compares sizes 30×42 and
        # more with PyTorch); Slice ops with a step are not constant-folded.
        warnings.filterwarnings(
            "ignore", r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore",
            r"The feature will be removed\. Please remove usage of this function",
            DeprecationWarning,
            r"torch\.onnx",
        )
        warnings.filterwarnings(
            "ignore",
            r"ONNX export mode is set to TrainingMode\.EVAL, but operator "
            r"'instance_norm' is set to train=True",
            UserWarning,
        )
        warnings.filterwarnings(
            "ignore",
            r"Converting a tensor to a Python boolean might cause the trace",
            torch.jit.TracerWarning,
            r"torch\.nn\.",
        )
        warnings.filterwarnings(
            "ignore", r"Constant folding - Only steps=1 can be constant folded", UserWarning
        )
        torch.onnx.export(
            PadCrop(net).eval(),
            (torch.zeros(1, 3, 64, 64),),
            buf,
            input_names=["image"],
            output_names=["translated"],
            opset_version=opset,
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "translated": {0: "batch", 2: "height", 3: "width"},
            },
            dynamo=False,
        )
    atomic_write_bytes(path, buf.getvalue())
    return path
