"""The FID/KID Inception weights: which file (torch-fidelity's InceptionV3 release, INCEPTION_URL),
where it is looked for (torch's hub cache, `weights_file`), how it is checked without running
anything in it (`check_weights`: weights_only=True, InceptionV3's exact layout, the sha256 prefix in
its published name), how it is fetched (`download_weights`), and what an offline user is told
(`weights_advice`, `weights_facts`). `unpaired weights [--check] [FILE]` is `weights_command`.
evaluation.py's `inception_features` builds the feature extractor from the file checked here.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from unpaired.errors import UserError
from unpaired.files import make_dirs, sha256_of

INCEPTION_URL = URL_INCEPTION_V3  # torch-fidelity's release of the FID Inception weights

# torch-fidelity downloads its InceptionV3 weights from one URL into torch's hub cache. Offline, a
# user must fetch that file elsewhere and copy it in, so every message names the URL, the file, the
# folder, and how to verify it. torch-fidelity publishes no full checksum: like torch.hub's own
# files, its file name carries the first hex digits of the file's sha256 ("-6726825d.pth"), which
# torch.hub's `check_hash` would compare; torch-fidelity does not. We compare that prefix, and print
# the full sha256 of the file found so it can be checked against a copy the user trusts.
HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's naming rule, as in torch.hub.HASH_REGEX


def weights_file() -> Path:
    """Where torch-fidelity's Inception weights are looked for: $TORCH_HOME/hub/checkpoints/<name>
    (torch.hub.get_dir(); default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name


def published_sha256_prefix() -> str:
    """The sha256 prefix in the weights' file name ("" if the name carries none)."""
    found = HUB_HASH.search(Path(INCEPTION_URL).name)
    return found.group(1) if found else ""


def weights_facts() -> dict[str, str]:
    """What an offline user needs, as fields: url, file, folder ("$TORCH_HOME/hub/checkpoints": no
    host path, these go into artifacts), sha256_prefix, check."""
    return {
        "url": INCEPTION_URL,
        "file": weights_file().name,
        "folder": "$TORCH_HOME/hub/checkpoints",
        "sha256_prefix": published_sha256_prefix(),
        "check": "uv run unpaired weights --check",
    }


def weights_advice() -> str:
    """One sentence: what to fetch, where to put it, how to verify it."""
    path, prefix = weights_file(), published_sha256_prefix()
    sha = (
        f"its sha256 starts with {prefix} (torch-fidelity publishes only this prefix, in the file name)"
        if prefix
        else "torch-fidelity publishes no checksum for it"
    )
    return (
        f"download {INCEPTION_URL} on a machine with internet and copy it, named {path.name}, into "
        f"{path.parent}/ ($TORCH_HOME/hub/checkpoints); {sha}; then check it with "
        f"`uv run unpaired weights --check`"
    )


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
        result.lines.append(
            f"{path}: not present (evaluate uses the bundled weights instead; `uv run unpaired "
            f"weights --compare FILE` compares the two); {weights_advice()}."
        )
        return result
    result.sha256 = sha256_of(path)
    prefix = published_sha256_prefix()
    result.published = bool(prefix) and result.sha256.startswith(prefix)
    result.lines.append(f"{path}: {path.stat().st_size:,} bytes, sha256 {result.sha256}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with code, truncated zip, HTML page: all "not a weights file"
        result.lines.append(
            f"Not a plain weights file ({type(err).__name__}): delete it; {weights_advice()}."
        )
        return result
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        result.lines.append(f"Holds no state dict of tensors: delete it; {weights_advice()}.")
        return result
    if build:
        try:
            load_inception(path)
        except Exception as err:  # missing/extra keys, wrong shapes
            detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            result.lines.append(
                f"Does not fit torch-fidelity's InceptionV3 ({detail}): delete it; "
                f"{weights_advice()}."
            )
            return result
    result.usable = True
    if result.published:
        result.lines.append(
            f"Usable: loads as weights only, fits InceptionV3, and its sha256 starts with "
            f"{prefix} as the published file's name says."
        )
    else:
        result.lines.append(
            f"Usable (loads as weights only, fits InceptionV3), but its sha256 does not start "
            f"with {prefix or '(none published)'}: not the file torch-fidelity publishes, so "
            f"FID/KID will not be comparable with published numbers."
        )
    return result


def load_inception(path: Path) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (2048-d pool features) from a file that check_weights has
    already loaded with weights_only=True (torch-fidelity itself loads it without that guard)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )


def download_weights(timeout: float = 20.0) -> str:
    """Fetch the weights into weights_file() (atomically, by torch.hub); "" or why it failed."""
    path = weights_file()
    try:
        make_dirs(path.parent)
    except UserError as err:  # a read-only cache: the weights are as unavailable as without network
        return str(err)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
    except (
        Exception
    ) as err:  # no network, DNS failure, HTTP error, timeout: all mean "not available"
        return (
            f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'no detail'}"
        )
    finally:
        socket.setdefaulttimeout(previous)
        for stale in path.parent.glob(f"{path.name}.*.partial"):  # torch.hub's temp file on failure
            stale.unlink(missing_ok=True)
    return ""


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
