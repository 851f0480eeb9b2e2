"""Evaluation pieces: batched translation, labelled sample grids, and FID/KID.

FID and KID come from torch-fidelity (the library behind many GAN papers' numbers; its InceptionV3 is
a port of the TF-slim network that FID was defined with, so values are comparable with published
ones). We call its feature-to-metric functions directly on features we extract, which lets the
arithmetic be tested offline with any small feature extractor.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_kid import kid_features_to_metric

from unpaired.images import read_uint8, to_float, to_uint8

Features = Callable[[torch.Tensor], torch.Tensor]   # uint8 N×3×H×W → float N×D
KID_SEED = 2020
INCEPTION_URL = URL_INCEPTION_V3     # torch-fidelity's release of the FID Inception weights


def load_images(folder: Path) -> tuple[list[str], torch.Tensor]:
    """All PNGs of a prepared folder, sorted by name, as a uint8 N×3×H×W tensor."""
    files = sorted(folder.glob("*.png"))
    if not files:
        return [], torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return [f.name for f in files], torch.stack([read_uint8(f) for f in files])


@torch.no_grad()
def translate(net: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """uint8 in, uint8 out, in batches on `device`."""
    out = [to_uint8(net(to_float(images[i:i + batch_size]).to(device)).cpu())
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.clone()


def labelled_grid(rows_a: list[torch.Tensor], rows_b: list[torch.Tensor], scale: int = 2) -> Image.Image:
    """A labelled grid: a header "real A | fake B | rec A", one row per A sample, then a header
    "real B | fake A | rec B" and one row per B sample. Each row is a list of three uint8 3×H×W
    tensors. Cells are upscaled by `scale` (nearest) so small images stay readable."""
    cell = rows_a[0][0].shape[-1] * scale if rows_a else rows_b[0][0].shape[-1] * scale
    pad, header = 4, 16
    blocks = [(("real A", "fake B", "rec A"), rows_a), (("real B", "fake A", "rec B"), rows_b)]
    height = sum(header + len(rows) * (cell + pad) for _, rows in blocks) + pad
    width = 3 * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for labels, rows in blocks:
        for c, label in enumerate(labels):
            draw.text((pad + c * (cell + pad) + 2, y), label, fill=(0, 0, 0))
        y += header
        for row in rows:
            for c, img in enumerate(row):
                tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.NEAREST)
                canvas.paste(tile, (pad + c * (cell + pad), y))
            y += cell + pad
    return canvas


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between two feature sets (N×D float tensors), with
    torch-fidelity's definitions; the KID subset size is the smaller set's size (at most 1000)."""
    real64, fake64 = real.double().cpu(), fake.double().cpu()
    fid = fid_statistics_to_metric(fid_features_to_statistics(real64), fid_features_to_statistics(fake64),
                                   verbose=False)["frechet_inception_distance"]
    size = min(len(real64), len(fake64), 1000)
    kid = kid_features_to_metric(real64, fake64, kid_subsets=kid_subsets, kid_subset_size=size,
                                 verbose=False, rng_seed=KID_SEED)
    return {"fid": float(fid), "kid": float(kid["kernel_inception_distance_mean"]),
            "kid_std": float(kid["kernel_inception_distance_std"])}


def inception_features(device: torch.device, timeout: float = 20.0) -> tuple[Features | None, str]:
    """torch-fidelity's InceptionV3 (2048-d pool features), or (None, why) when its weights are
    neither cached nor downloadable. Weights go to torch's standard hub cache. The file is first
    loaded with weights_only=True, so a file holding anything but tensors is refused."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
        except Exception as err:  # no network, DNS failure, HTTP error, timeout: all mean "not available"
            return None, (f"the InceptionV3 weights for FID/KID are not in {path.parent} and could not be "
                          f"downloaded ({type(err).__name__}); FID/KID skipped")
        finally:
            socket.setdefaulttimeout(previous)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        return None, f"{path}: not a plain weights file ({type(err).__name__}); delete it; FID/KID skipped"
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    net = net.to(device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(images[i:i + 32].to(device))[0].cpu() for i in range(0, len(images), 32)])
    return features, ""


