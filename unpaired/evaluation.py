"""Evaluation pieces: batched translation, labelled sample grids, and FID/KID.

FID and KID come from torch-fidelity (the library behind many GAN papers' numbers; its InceptionV3 is
a port of the TF-slim network that FID was defined with, so values are comparable with published
ones). We call its feature-to-metric functions directly on features we extract, which lets the
arithmetic be tested offline with any small feature extractor.
"""
from __future__ import annotations

import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_kid import kid_features_to_metric

from unpaired.errors import UserError
from unpaired.files import sha256_of
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
    torch-fidelity's definitions; the KID subset size is the smaller set's size (at most 1000).
    Non-finite features give NaN values (never a best epoch), not a linear-algebra error."""
    real64, fake64 = real.double().cpu(), fake.double().cpu()
    if not (torch.isfinite(real64).all() and torch.isfinite(fake64).all()):   # e.g. a diverged generator
        return {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
    fid = fid_statistics_to_metric(fid_features_to_statistics(real64), fid_features_to_statistics(fake64),
                                   verbose=False)["frechet_inception_distance"]
    size = min(len(real64), len(fake64), 1000)
    kid = kid_features_to_metric(real64, fake64, kid_subsets=kid_subsets, kid_subset_size=size,
                                 verbose=False, rng_seed=KID_SEED)
    return {"fid": float(fid), "kid": float(kid["kernel_inception_distance_mean"]),
            "kid_std": float(kid["kernel_inception_distance_std"])}


# --- the FID Inception weights ------------------------------------------------------------------
# torch-fidelity downloads its InceptionV3 weights from one URL into torch's hub cache. Offline, a
# user must fetch that file elsewhere and copy it in, so every message names the URL, the file, the
# folder, and how to verify it. torch-fidelity publishes no full checksum: like torch.hub's own
# files, its file name carries the first hex digits of the file's sha256 ("-6726825d.pth"), which
# torch.hub's `check_hash` would compare; torch-fidelity does not. We compare that prefix, and print
# the full sha256 of the file found so it can be checked against a copy the user trusts.
HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")   # torch.hub's naming rule, as in torch.hub.HASH_REGEX
MIN_METRIC_IMAGES = 2      # FID needs a covariance, KID pairs of distinct images: >= 2 per side


def weights_file() -> Path:
    """Where torch-fidelity's Inception weights are looked for: $TORCH_HOME/hub/checkpoints/<name>
    (torch.hub.get_dir(); default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name


def published_sha256_prefix() -> str:
    """The sha256 prefix in the weights' file name ("" if the name carries none)."""
    found = HUB_HASH.search(Path(INCEPTION_URL).name)
    return found.group(1) if found else ""


def weights_facts() -> dict[str, str]:
    """What an offline user needs, as fields: url, file, folder, sha256_prefix, check."""
    path = weights_file()
    return {"url": INCEPTION_URL, "file": path.name, "folder": str(path.parent),
            "sha256_prefix": published_sha256_prefix(), "check": "uv run unpaired weights --check"}


def weights_advice() -> str:
    """One sentence: what to fetch, where to put it, how to verify it."""
    path, prefix = weights_file(), published_sha256_prefix()
    sha = (f"its sha256 starts with {prefix} (torch-fidelity publishes only this prefix, in the file name)"
           if prefix else "torch-fidelity publishes no checksum for it")
    return (f"download {INCEPTION_URL} on a machine with internet and copy it, named {path.name}, into "
            f"{path.parent}/ ($TORCH_HOME/hub/checkpoints); {sha}; then check it with "
            f"`uv run unpaired weights --check`")


@dataclass
class WeightsCheck:
    """The verdict on a weights file: usable (FID/KID can run with it), published (its sha256
    matches the name's prefix), and the lines that explain it."""
    path: Path
    usable: bool = False
    published: bool = False
    sha256: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def why(self) -> str:
        return " ".join(self.lines)


def check_weights(path: Path | None = None, build: bool = True) -> WeightsCheck:
    """Check a copy of torch-fidelity's Inception weights without running anything in it: the file
    must load with torch.load(weights_only=True) as a mapping of tensors and (build=True) fit
    torch-fidelity's InceptionV3 exactly; its sha256 is compared with the file name's prefix."""
    path = Path(path) if path is not None else weights_file()
    result = WeightsCheck(path)
    if not path.is_file():
        result.lines.append(f"{path}: not present; {weights_advice()}.")
        return result
    result.sha256 = sha256_of(path)
    prefix = published_sha256_prefix()
    result.published = bool(prefix) and result.sha256.startswith(prefix)
    result.lines.append(f"{path}: {path.stat().st_size:,} bytes, sha256 {result.sha256}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with code, truncated zip, HTML page: all "not a weights file"
        result.lines.append(f"Not a plain weights file ({type(err).__name__}): delete it; {weights_advice()}.")
        return result
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        result.lines.append(f"Holds no state dict of tensors: delete it; {weights_advice()}.")
        return result
    if build:
        try:
            _inception(path)
        except Exception as err:  # missing/extra keys, wrong shapes
            detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            result.lines.append(f"Does not fit torch-fidelity's InceptionV3 ({detail}): delete it; "
                                f"{weights_advice()}.")
            return result
    result.usable = True
    if result.published:
        result.lines.append(f"Usable: loads as weights only, fits InceptionV3, and its sha256 starts with "
                            f"{prefix} as the published file's name says.")
    else:
        result.lines.append(f"Usable (loads as weights only, fits InceptionV3), but its sha256 does not start "
                            f"with {prefix or '(none published)'}: not the file torch-fidelity publishes, so "
                            f"FID/KID will not be comparable with published numbers.")
    return result


def _inception(path: Path) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (2048-d pool features) from a file that check_weights has
    already loaded with weights_only=True (torch-fidelity itself loads it without that guard)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


def download_weights(timeout: float = 20.0) -> str:
    """Fetch the weights into weights_file() (atomically, by torch.hub); "" or why it failed."""
    path = weights_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
    except Exception as err:  # no network, DNS failure, HTTP error, timeout: all mean "not available"
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'no detail'}"
    finally:
        socket.setdefaulttimeout(previous)
        for stale in path.parent.glob(f"{path.name}.*.partial"):   # torch.hub's temp file on failure
            stale.unlink(missing_ok=True)
    return ""


def inception_features(device: torch.device, timeout: float = 20.0) -> tuple[Features | None, str]:
    """torch-fidelity's InceptionV3 (2048-d pool features) as a function uint8 N×3×H×W → float
    N×2048, or (None, why) when its weights are neither cached nor downloadable, or unusable. `why`
    names the URL, the file, the folder and the expected sha256 prefix. Weights go to torch's hub
    cache (weights_file()). The file is first loaded with weights_only=True, so a file holding
    anything but tensors is refused. A usable file that is not the published one gives
    (features, warning)."""
    path = weights_file()
    if not path.is_file():
        failure = download_weights(timeout)
        if failure:
            return None, (f"FID/KID skipped: the InceptionV3 weights are not in {path.parent} and could not be "
                          f"downloaded ({failure}); {weights_advice()}")
    verdict = check_weights(path, build=False)
    if not verdict.usable:
        return None, f"FID/KID skipped: {verdict.why}"
    try:
        net = _inception(path).to(device).eval()
    except Exception as err:
        return None, (f"FID/KID skipped: {path} does not fit torch-fidelity's InceptionV3 ({type(err).__name__}); "
                      f"delete it; {weights_advice()}")

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(images[i:i + 32].to(device))[0].cpu() for i in range(0, len(images), 32)])
    note = "" if verdict.published else (
        f"{path}: its sha256 ({verdict.sha256[:16]}...) does not start with {published_sha256_prefix()}, so it is "
        f"not the file torch-fidelity publishes: FID/KID are not comparable with published numbers")
    return features, note


def weights_command(file: str | None, check_only: bool) -> None:
    """`unpaired weights [--check] [FILE]`: say whether the FID weights are usable (download them
    first unless --check or FILE); raises UserError (exit 2) when they are not."""
    path = Path(file) if file else weights_file()
    if not file and not check_only and not path.is_file():
        print(f"downloading {INCEPTION_URL} -> {path}")
        failure = download_weights()
        if failure:
            raise UserError(f"{path}: download failed ({failure}); {weights_advice()}")
    verdict = check_weights(path)
    for line in verdict.lines[:-1]:
        print(line)
    if not verdict.usable:
        raise UserError(verdict.lines[-1])
    print(verdict.lines[-1])
    if file and Path(file).resolve() != weights_file().resolve():
        print(f"To use it, copy it to {weights_file()}")
