"""Evaluation: the evaluate params, each epoch's score (its sample grid and FID/KID, cached per
checkpoint), the choice of the best epoch, the test set translated by it, and the pieces under them:
batched translation, labelled sample grids, FID/KID and the Inception features they are computed on
(which weights file, where from and checked how: unpaired/weights.py).

FID and KID come from torch-fidelity (the library behind many GAN papers' numbers; its InceptionV3 is
a port of the TF-slim network that FID was defined with, so values are comparable with published
ones). We call its feature-to-metric functions directly on features we extract, which lets the
arithmetic be tested offline with any small feature extractor. Its weights: torch-fidelity's own file
when it is in torch's hub cache, else the copy a locked package ships (unpaired/inception.py), so
every run is scored, offline too; the stage never downloads.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch_fidelity
from PIL import Image, ImageDraw
from threadpoolctl import threadpool_limits
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from unpaired import checkpoint, inception, params, threads
from unpaired.devices import check_device
from unpaired.errors import UserError, uninterrupted
from unpaired.files import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    make_dirs,
    remove_stale_temporaries,
    sha256_of,
)
from unpaired.images import png_bytes, read_uint8, to_float, to_uint8
from unpaired.report import TEST_SET_KINDS, pages_for_test_set
from unpaired.weights import check_weights, load_inception, weights_file

Features = Callable[[torch.Tensor], torch.Tensor]  # uint8 N×3×H×W → float N×D
KID_SEED = 2020


def load_images(folder: Path) -> tuple[list[str], torch.Tensor]:
    """All PNGs of a prepared folder, sorted by name, as a uint8 N×3×H×W tensor."""
    files = sorted(folder.glob("*.png"))
    if not files:
        return [], torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return [f.name for f in files], torch.stack([read_uint8(f) for f in files])


@torch.no_grad()
def translate(
    net: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """uint8 in, uint8 out, in batches on `device`."""
    out = [
        to_uint8(net(to_float(images[i : i + batch_size]).to(device)).cpu())
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else images.clone()


def labelled_grid(
    rows_a: list[torch.Tensor], rows_b: list[torch.Tensor], scale: int = 2, one_way: bool = False
) -> Image.Image:
    """A labelled grid: a header "real A | fake B | rec A", one row per A sample, then a header
    "real B | fake A | rec B" and one row per B sample. Each row is a list of three uint8 3×H×W
    tensors. Cells are upscaled by `scale` (nearest) so small images stay readable. `one_way` (a
    model with one generator, A→B): one block "real A | fake B" of rows of two, `rows_b` unused."""
    cell = rows_a[0][0].shape[-1] * scale if rows_a else rows_b[0][0].shape[-1] * scale
    pad, header = 4, 16
    blocks = [(("real A", "fake B", "rec A"), rows_a), (("real B", "fake A", "rec B"), rows_b)]
    if one_way:  # a one-directional model (CUT): real A | fake B, and no B block
        blocks = [(("real A", "fake B"), rows_a)]
    height = sum(header + len(rows) * (cell + pad) for _, rows in blocks) + pad
    width = len(blocks[0][0]) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for labels, rows in blocks:
        for c, label in enumerate(labels):
            draw.text((pad + c * (cell + pad) + 2, y), label, fill=(0, 0, 0))
        y += header
        for row in rows:
            for c, img in enumerate(row):
                tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize(
                    (cell, cell), Image.Resampling.NEAREST
                )
                canvas.paste(tile, (pad + c * (cell + pad), y))
            y += cell + pad
    return canvas


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two float64 feature sets (N×D, M×D, N, M >= 2): |mu1 - mu2|² + tr S1 + tr S2 -
    2 tr sqrt(S1 S2), S the sample covariances (N - 1 in the denominator), as torch-fidelity's
    fid_statistics_to_metric (TTUR's fid.py). That one takes the eigenvalues of the D×D product S1 S2,
    5-30 s per call for D = 2048 on 2 CPU cores, i.e. minutes per evaluate run; so when the smaller
    set has at most D images we use the same quantity in Gram form (hand-written for speed): with
    S1 = A Aᵀ, S2 = B Bᵀ (A = centred real features / sqrt(N - 1), D×N; B likewise), the non-zero
    eigenvalues of S1 S2 are those of (AᵀB)(AᵀB)ᵀ, so tr sqrt(S1 S2) is the sum of the singular
    values of the N×M matrix AᵀB: exact, O(N·M·D). tests/test_inception.py checks it against
    torch-fidelity's function."""
    n, m, d = len(real), len(fake), real.shape[1]
    if min(n, m) > d:
        return float(
            fid_statistics_to_metric(
                fid_features_to_statistics(real), fid_features_to_statistics(fake), verbose=False
            )["frechet_inception_distance"]
        )
    a = (real - real.mean(0)) / math.sqrt(n - 1)
    b = (fake - fake.mean(0)) / math.sqrt(m - 1)
    diff = real.mean(0) - fake.mean(0)
    tr_covmean = torch.linalg.svdvals(a @ b.T).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between two feature sets (N×D float tensors), with
    torch-fidelity's definitions; the KID subset size is the smaller set's size (at most 1000),
    numpy's BLAS limited to torch's thread count meanwhile.
    Non-finite features give NaN values (never a best epoch), not a linear-algebra error."""
    real64, fake64 = real.double().cpu(), fake.double().cpu()
    if not (
        torch.isfinite(real64).all() and torch.isfinite(fake64).all()
    ):  # e.g. a diverged generator
        return {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
    fid = frechet_distance(real64, fake64)
    size = min(len(real64), len(fake64), 1000)
    # torch-fidelity's KID runs numpy matrix products on each subset (up to 1000×2048): numpy's BLAS
    # gets torch's thread count (evaluate.threads), not its own one-per-CPU pool, whose threads
    # spin-wait between the many small products (10x slower on a loaded 2-CPU machine: benchmarks/evaluate.py)
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        kid = kid_features_to_metric(
            real64,
            fake64,
            kid_subsets=kid_subsets,
            kid_subset_size=size,
            verbose=False,
            rng_seed=KID_SEED,
        )
    return {
        "fid": float(fid),
        "kid": float(kid["kernel_inception_distance_mean"]),
        "kid_std": float(kid["kernel_inception_distance_std"]),
    }


# --- the Inception features FID/KID are computed on (the weights file: unpaired/weights.py) ------
MIN_METRIC_IMAGES = 2  # FID needs a covariance, KID pairs of distinct images: >= 2 per side


def inception_features(device: torch.device) -> tuple[Features | None, dict[str, str], str]:
    """The FID InceptionV3 (2048-d pool features) as a function uint8 N×3×H×W → float N×2048, the
    facts of the weights it runs (source, file, sha256: no host path, for artifacts), and "" — or
    (None, {}, why) when no weights are usable. Weights, in order: torch-fidelity's own file in
    torch's hub cache (weights_file()) when it is there, loads with weights_only=True and has the
    published sha256 prefix; else the bundled copy (unpaired/inception.py: pinned by uv.lock, its
    sha256 checked, read without running anything in it). Never downloads. Host paths and error
    texts go to the console (stdout/stderr), never into the returned strings."""
    path, net, facts = weights_file(), None, {}
    if path.is_file():
        verdict = check_weights(path, build=False)
        if verdict.usable and verdict.published:
            try:
                net = load_inception(path)
                facts = {
                    "source": f"torch-fidelity {torch_fidelity.__version__}",
                    "file": path.name,
                    "sha256": verdict.sha256,
                }
                print(f"FID/KID: torch-fidelity's Inception weights {path}")
            except Exception as err:  # noqa: BLE001 - does not fit: the bundled weights take over
                warn(
                    f"{path}: does not fit torch-fidelity's InceptionV3 ({type(err).__name__}); using the bundled "
                    f"Inception weights instead"
                )
        else:
            warn(f"{verdict.why} Using the bundled Inception weights instead.")
    if net is None:
        try:
            net = inception.bundled_inception()
        except UserError as err:
            warn(str(err))
            return (
                None,
                {},
                (
                    f"FID/KID skipped: the bundled Inception weights ({inception.PACKAGE} "
                    f"{inception.VERSION}) are missing or altered (the console says which file) and "
                    f"torch-fidelity's {path.name} is absent from $TORCH_HOME/hub/checkpoints or unusable; "
                    f"{inception.REINSTALL}"
                ),
            )
        facts = inception.bundled_facts()
        print(
            f"FID/KID: the bundled Inception weights {inception.bundled_file()} ({inception.PACKAGE} "
            f"{inception.VERSION})"
        )
    net = net.to(device).eval()
    if device.type == "cpu":
        # channels_last (NHWC): oneDNN's convolutions and the pooling layers run without layout
        # conversions: 1.4x less CPU time, 2x faster on the loaded 2-CPU machine (benchmarks/evaluate.py).
        # The same arithmetic in another order: features differ from NCHW's by < 1e-5.
        net = net.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [net(images[i : i + 32].to(device))[0].cpu() for i in range(0, len(images), 32)]
        )

    return features, facts, ""


# --- evaluate: score every epoch, pick the best, translate the test set -------------------------
CACHE_VERSION = 4  # 4: rows hold kid_std_AtoB / kid_std_BtoA
TEST_PAGE_ROWS = 50  # images per direction on one page of metrics/test_set/
DIRECTION_COLUMNS = (
    "fid_AtoB",
    "fid_BtoA",
    "kid_AtoB",
    "kid_BtoA",
)  # plotted per epoch (metrics/eval_plots)
KID_STD_COLUMNS = ("kid_std_AtoB", "kid_std_BtoA")  # KID's std over its subsets, per direction
METRIC_COLUMNS = (
    *DIRECTION_COLUMNS,
    *KID_STD_COLUMNS,
    "fid",
    "kid",
)  # fid, kid: sums over both directions
# TTUR's README (Heusel et al., the FID authors): FID needs more images than the 2048 feature
# dimensions (else the covariance is singular) and, to not underestimate, about 10,000; below that
# it is biased (Bińkowski et al. 2018: it grows as the set shrinks), while KID is unbiased.
FID_MIN_IMAGES = 2048


@dataclass(frozen=True)
class EvaluateParams(params.Params):
    #: test images per direction in each epoch's sample grid (the same images every epoch)
    samples: int = 4
    #: best epoch by kid or fid (summed over both directions), or last
    select: Literal["kid", "fid", "last"] = "kid"
    #: auto: FID/KID wherever they can run (>= 2 test images per domain, usable Inception weights);
    #: required: stop where they cannot; off: none
    metrics: Literal["auto", "required", "off"] = "auto"
    #: KID subsets (each of up to 1000 test images; torch-fidelity's default is 100)
    kid_subsets: int = 100
    batch_size: int = 16  # images per translation and Inception pass
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    #: CPU threads: auto (every CPU: the machine decides, never its load) or N; OpenMP threads wait
    #: passively when other work holds the CPUs at start, else spin
    threads: int | str = "auto"

    BOUNDS = {
        "samples": params.SAMPLES,
        "kid_subsets": params.Bound(
            100_000,
            "each subset is one kernel over up to 1000 test images; the usual 100 is enough",
        ),
        "batch_size": params.Bound(1024, "images per translation and Inception pass"),
        "threads": params.THREADS,
    }

    def validate(self, prefix: str) -> None:
        params.check(self.samples >= 1, f"{prefix}.samples", f"must be >= 1, got {self.samples}")
        params.check(
            self.kid_subsets >= 1, f"{prefix}.kid_subsets", f"must be >= 1, got {self.kid_subsets}"
        )
        params.check(
            self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}"
        )
        threads.check(self.threads, f"{prefix}.threads")
        check_device(self.device, f"{prefix}.device")


def warn(message: str) -> None:
    """`warning: message` on stderr."""
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class EvalImages:
    """The prepared test images: per domain the PNG file names (sorted) and a uint8 N×3×H×W tensor
    (N may be 0)."""

    folder: Path
    names_A: list[str]
    A: torch.Tensor
    names_B: list[str]
    B: torch.Tensor

    @classmethod
    def load(cls, folder: Path) -> EvalImages:
        """`folder`/testA and `folder`/testB (absent or empty folders give empty domains)."""
        return cls(folder, *load_images(folder / "testA"), *load_images(folder / "testB"))

    def empty_note(self) -> str:
        """Why some grids and pages are empty ("" when both domains have test images)."""
        empty = " and ".join(
            f"{self.folder}/test{d}" for d, t in (("A", self.A), ("B", self.B)) if not len(t)
        )
        return (
            (
                f"no test images in {empty}: nothing to translate there; raise prepare.test_fraction (or add "
                f"images) and run prepare again"
            )
            if empty
            else ""
        )


@dataclass(frozen=True)
class MetricsPlan:
    """Whether FID/KID run: the feature extractor and the test images (None when they are skipped), a
    short and a full reason when they are skipped ("" when they run), a note to show when they run,
    the facts of the Inception weights that score them ({} when skipped), and the images an
    Inception pass takes (evaluate.batch_size). The strings and facts go into artifacts: no host
    path, no error text."""

    features: Features | None = None
    test: EvalImages | None = None
    skipped: str = ""
    why: str = ""
    note: str = ""
    weights: dict[str, str] = field(default_factory=dict)
    batch_size: int = 16
    reals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`features` of uint8 N×3×H×W `images`, `batch_size` images an Inception pass: float N×D."""
        return torch.cat(
            [
                self.features(images[i : i + self.batch_size])
                for i in range(0, len(images), self.batch_size)
            ]
        )

    def real(self, domain: str) -> torch.Tensor:
        """The features of the real test images of `domain` ("A" or "B"), float N×D, computed once,
        on first use (a run whose epochs all come from the cache computes none)."""
        if domain not in self.reals:
            self.reals[domain] = self.embed(getattr(self.test, domain))
        return self.reals[domain]


def plan_metrics(p: EvaluateParams, device: torch.device, test: EvalImages) -> MetricsPlan:
    """Decide whether FID/KID run (evaluate.metrics, at least MIN_METRIC_IMAGES test images per
    domain, usable Inception weights); warns on stderr when they are skipped. Raises UserError when
    evaluate.metrics is required and they cannot run."""
    if p.metrics == "off":
        return MetricsPlan(
            skipped="evaluate.metrics is off", why="FID/KID skipped: evaluate.metrics is off"
        )
    n_A, n_B = len(test.A), len(test.B)
    if min(n_A, n_B) < MIN_METRIC_IMAGES:
        short = f"fewer than {MIN_METRIC_IMAGES} test images in a domain"
        why = (
            f"FID/KID skipped: they need at least {MIN_METRIC_IMAGES} test images per domain, and "
            f"{test.folder}/testA has {n_A}, {test.folder}/testB has {n_B}; raise prepare.test_fraction or "
            f"add images"
        )
    else:
        short = "no usable Inception weights"
        features, weights, why = inception_features(device)
        if features is not None:
            if why:
                warn(why)
            return MetricsPlan(features, test, note=why, weights=weights, batch_size=p.batch_size)
    if p.metrics == "required":
        raise UserError(f"evaluate.metrics is required but {why.removeprefix('FID/KID skipped: ')}")
    warn(why)
    return MetricsPlan(skipped=short, why=why)


def kid_subset_size(test: EvalImages) -> int:
    """KID's subset size: the smaller test domain's image count, at most 1000 (fid_kid)."""
    return min(len(test.A), len(test.B), 1000)


def protocol(
    p: EvaluateParams,
    plan: MetricsPlan,
    test: EvalImages,
    directions: tuple[str, ...] = ("AtoB", "BtoA"),
) -> str:
    """One sentence on how FID/KID were computed: which images against which (per direction of
    `directions`: checkpoint.directions), the resize, the weights (plan.weights), KID's subsets;
    "" when they were skipped. No host path."""
    if plan.features is None:
        return ""
    n_A, n_B = len(test.A), len(test.B)
    w = plan.weights
    weights = (
        f"{w['source']} {w['file']}, sha256 {w['sha256'][:12]}…"
        if w
        else "a stand-in feature extractor"
    )
    which = (
        f"Per direction, on the held-out test split: A→B compares G_A's translations of the {n_A} test A "
        f"images with the {n_B} real test B images, B→A G_B's translations of the {n_B} test B images with "
        f"the {n_A} real test A images"
        if "BtoA" in directions
        else f"One direction (the run has one generator, A→B), on the held-out test split: A→B compares "
        f"G's translations of the {n_A} test A images with the {n_B} real test B images"
    )
    return (
        f"{which}; every image is resized to 299×299 px (torch-fidelity's TF-1.x bilinear "
        f"resize) and embedded as InceptionV3's 2048-d pool features (weights: {weights}); FID is the Fréchet "
        f"distance of the two feature Gaussians, KID the mean ± std of the unbiased MMD² (cubic polynomial "
        f"kernel) over {p.kid_subsets} random subsets of {kid_subset_size(test)} images (seed {KID_SEED}); "
        + ("fid and kid sum both directions." if "BtoA" in directions else "fid and kid are A→B's.")
    )


def fid_caution(plan: MetricsPlan, test: EvalImages) -> str:
    """A warning when the smaller test domain has at most FID_MIN_IMAGES images ("" otherwise or
    when FID/KID were skipped): FID is biased there, KID is not."""
    n = min(len(test.A), len(test.B))
    if plan.features is None or n > FID_MIN_IMAGES:
        return ""
    return (
        f"FID with {n} images in the smaller test set is biased (it needs more than {FID_MIN_IMAGES} images, "
        f"the feature dimension, and about 10,000 not to be underestimated): compare FID only between runs "
        f"on the same test images. KID is unbiased at any size, so it is the better guide here "
        f"(evaluate.select: kid); mind its ± std."
    )


def score_checkpoint(
    path: Path, p: EvaluateParams, device: torch.device, test: EvalImages, plan: MetricsPlan
) -> tuple[dict[str, float], bytes | None]:
    """One checkpoint: its FID/KID row (METRIC_COLUMNS; {} without metrics) and its sample grid as
    PNG bytes (the first evaluate.samples test images per direction; None without test images)."""
    G_A, G_B, _ = checkpoint.load_generators(path, device)
    if G_B is None:  # one direction (CUT): A→B alone
        return _score_one_way(G_A, p, device, test, plan)
    fake_B = translate(G_A, test.A, p.batch_size, device)
    fake_A = translate(G_B, test.B, p.batch_size, device)
    k = p.samples
    rec_A = translate(G_B, fake_B[:k], p.batch_size, device)
    rec_B = translate(G_A, fake_A[:k], p.batch_size, device)
    rows_a = [list(t) for t in zip(test.A[:k], fake_B[:k], rec_A)]
    rows_b = [list(t) for t in zip(test.B[:k], fake_A[:k], rec_B)]
    png = png_bytes(labelled_grid(rows_a, rows_b)) if rows_a or rows_b else None
    row: dict[str, float] = {}
    if plan.features is not None:
        real_A, real_B = plan.real("A"), plan.real("B")
        fakes = plan.embed(
            torch.cat([fake_B, fake_A])
        )  # both directions' fakes in the same batches
        ab = fid_kid(real_B, fakes[: len(fake_B)], p.kid_subsets)
        ba = fid_kid(real_A, fakes[len(fake_B) :], p.kid_subsets)
        row = {
            "fid_AtoB": ab["fid"],
            "fid_BtoA": ba["fid"],
            "kid_AtoB": ab["kid"],
            "kid_BtoA": ba["kid"],
            "kid_std_AtoB": ab["kid_std"],
            "kid_std_BtoA": ba["kid_std"],
            "fid": ab["fid"] + ba["fid"],
            "kid": ab["kid"] + ba["kid"],
        }
    return row, png


def _score_one_way(
    G: torch.nn.Module, p: EvaluateParams, device: torch.device, test: EvalImages, plan: MetricsPlan
) -> tuple[dict[str, float], bytes | None]:
    """score_checkpoint for a one-directional generator G (A→B): the row's A→B columns, with fid and
    kid equal to them (no B→A columns), and a grid of real A | fake B rows."""
    fake_B = translate(G, test.A, p.batch_size, device)
    rows_a = [list(t) for t in zip(test.A[: p.samples], fake_B[: p.samples])]
    png = png_bytes(labelled_grid(rows_a, [], one_way=True)) if rows_a else None
    if plan.features is None:
        return {}, png
    ab = fid_kid(plan.real("B"), plan.embed(fake_B), p.kid_subsets)
    row = {"fid_AtoB": ab["fid"], "kid_AtoB": ab["kid"], "kid_std_AtoB": ab["kid_std"]}
    return {**row, "fid": ab["fid"], "kid": ab["kid"]}, png


def scored(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    """The `columns` the scored `rows` hold (a one-directional run's rows have no B→A columns)."""
    return [c for c in columns if any(c in r for r in rows)]


def run_directions(ckpts: dict[int, Path]) -> tuple[str, ...]:
    """The directions the run's generators translate (checkpoint.directions of its last epoch
    file): ("AtoB", "BtoA") for CycleGAN, ("AtoB",) for CUT."""
    return checkpoint.directions(checkpoint.load(ckpts[max(ckpts)]))


@dataclass
class Scores:
    """Every epoch's score: `rows` ({"epoch": N, **METRIC_COLUMNS} in epoch order), `grids` (epoch →
    its grid PNG in the cache; epochs without one are absent), `checkpoints` (epoch → file),
    `digests` (epoch → the file's sha256) and `settings` (the cache key's other half)."""

    rows: list[dict[str, Any]]
    grids: dict[int, Path]
    checkpoints: dict[int, Path]
    digests: dict[int, str]
    settings: str

    def row(self, epoch: int) -> dict[str, Any]:
        return next(r for r in self.rows if r["epoch"] == epoch)


def epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """epoch → `folder`/epoch_NNN.pt, in epoch order; raises UserError when there is none."""
    ckpts = checkpoint.epoch_files(folder)
    if not ckpts:
        raise UserError(f"{folder}: no epoch_NNN.pt checkpoints; run the train stage first")
    return ckpts


def train_run(checkpoints: Path) -> dict[str, Any]:
    """{"device": "cpu"|"cuda"|"mps", "world_size": N} as `checkpoints`/last.pt records them (what
    train.device auto resolved to, and train.devices), for the report; {} when last.pt is absent,
    unreadable or older than that record."""
    try:
        last = checkpoint.load(checkpoints / "last.pt")
    except UserError:
        return {}
    return {k: last[k] for k in ("device", "world_size") if isinstance(last, dict) and k in last}


def compute_facts(device: torch.device) -> dict[str, Any]:
    """What changes the numbers a device computes, for the cache key (scores from different devices
    are never mixed): the device type, the torch version, and whether CUDA matmuls / cuDNN
    convolutions may use TF32."""
    return {
        "device": device.type,
        "torch": torch.__version__,
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
    }


class EvalCache:
    """evaluate's cache: `root` (models/eval_cache, a persist output that dvc.lock records) and
    `pending` beside it (<root>.pending, which neither DVC nor git tracks). What a run computes is
    written to `pending` and moves into `root` only when the run has written every output
    (`commit`): an interrupted or failed run leaves the recorded cache as it was, so `dvc status`
    shows no change of it and `make repro`'s put-back never has to touch it, while the next run
    still finds what the stopped one computed. Entries are files named by their key (and
    test_set-<key> folders)."""

    def __init__(self, root: Path):
        self.root = root
        self.pending = root.with_name(root.name + ".pending")

    def start(self) -> None:
        """Create both folders and remove what a killed run's writes left (temporaries)."""
        make_dirs(self.root)
        make_dirs(self.pending)
        remove_stale_temporaries(self.root, self.pending)

    def find(self, name: str) -> Path | None:
        """The entry `name` from the cache, else from pending; None when neither has it."""
        for folder in (self.root, self.pending):
            if (folder / name).exists():
                return folder / name
        return None

    def new(self, name: str) -> Path:
        """Where a new entry `name` is written (in pending)."""
        return self.pending / name

    def commit(self, test_set: Path) -> None:
        """Move every pending entry into the cache, keep only `test_set`'s test-set pages (the
        current best's), and remove the pending folder. Ctrl-C is ignored meanwhile."""
        with uninterrupted():
            for entry in sorted(self.pending.iterdir()) if self.pending.is_dir() else []:
                if entry.name.startswith("."):
                    continue  # a temporary (removed below)
                target = self.root / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                entry.replace(target)
            for old in self.root.glob("test_set-*"):
                if old.name != test_set.name:
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.pending, ignore_errors=True)


def score_epochs(
    ckpts: dict[int, Path],
    cache: EvalCache,
    p: EvaluateParams,
    device: torch.device,
    test: EvalImages,
    plan: MetricsPlan,
) -> Scores:
    """Score every epoch checkpoint of `ckpts` (epoch_checkpoints), each read from `cache` when the
    same checkpoint (by sha256) was scored on the same test images with the same settings, and stored
    there (pending until EvalCache.commit) otherwise. Raises UserError for a damaged or diverged
    checkpoint."""
    settings = json.dumps(
        {
            "v": CACHE_VERSION,
            "samples": p.samples,
            "kid_subsets": p.kid_subsets,
            "metrics": plan.features is not None,
            "A": test.names_A,
            "B": test.names_B,
            "weights": plan.weights.get("sha256", ""),
            **compute_facts(device),
        },
        sort_keys=True,
    )
    cache.start()
    scores = Scores([], {}, ckpts, {}, settings)
    for epoch, path in ckpts.items():
        scores.digests[epoch] = sha256_of(path)
        key = hashlib.sha256((scores.digests[epoch] + settings).encode()).hexdigest()[:32]
        entry, grid_file = cache.find(f"{key}.json"), cache.find(f"{key}.png")
        cached = json.loads(entry.read_text()) if entry is not None else None
        if cached is not None and (not cached["grid"] or grid_file is not None):
            row, has_grid = cached["row"], cached["grid"]
            print(f"epoch {epoch:03d}: cached")
        else:
            row, png = score_checkpoint(path, p, device, test, plan)
            has_grid, grid_file = png is not None, cache.new(f"{key}.png")
            if has_grid:  # the grid first, then the entry that says the grid is there
                atomic_write_bytes(grid_file, png)
            atomic_write_json(cache.new(f"{key}.json"), {"row": row, "grid": has_grid})
            print(
                f"epoch {epoch:03d}: "
                + (", ".join(f"{k} {v:.4g}" for k, v in row.items()) or "grid only")
            )
        scores.rows.append({"epoch": epoch, **row})
        if has_grid:
            scores.grids[epoch] = grid_file
    return scores


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def select_best(rows: list[dict[str, Any]], select: str, skipped: str) -> dict[str, Any]:
    """The best epoch: the lowest finite `select` (kid or fid) value, else the last epoch; never one
    whose metric is NaN or infinite. Returns epoch, selected_by (kid, fid or last), fallback (True
    when `select` asked for a metric and the last epoch was taken instead) and reason (one line).
    `skipped`: why FID/KID were not computed ("" when they were)."""
    last = rows[-1]["epoch"]
    if select == "last":
        return {
            "epoch": last,
            "selected_by": "last",
            "fallback": False,
            "reason": "the last epoch (evaluate.select is last)",
        }
    name = select.upper()
    if skipped:
        return {
            "epoch": last,
            "selected_by": "last",
            "fallback": True,
            "reason": f"the LAST epoch, not the lowest {name} that evaluate.select asks for: FID/KID were "
            f"skipped ({skipped})",
        }
    good = [r for r in rows if finite(r.get(select))]
    bad = [r["epoch"] for r in rows if not finite(r.get(select))]
    if not good:
        return {
            "epoch": last,
            "selected_by": "last",
            "fallback": True,
            "reason": f"the LAST epoch, not the lowest {name} that evaluate.select asks for: every epoch's "
            f"{name} is NaN or infinite",
        }
    best = min(good, key=lambda r: (r[select], r["epoch"]))["epoch"]
    reason = (
        f"lowest {name} summed over both directions"
        if any("kid_BtoA" in r or "fid_BtoA" in r for r in rows)
        else f"lowest {name} of A→B (the run's one direction)"
    )
    if bad:
        reason += f" (epochs {', '.join(map(str, bad))} left out: {name} is NaN or infinite)"
    return {"epoch": best, "selected_by": select, "fallback": False, "reason": reason}


def translated_test_set(
    cache: EvalCache,
    scores: Scores,
    epoch: int,
    p: EvaluateParams,
    device: torch.device,
    test: EvalImages,
) -> Path:
    """The folder in `cache` holding the test-set pages of `epoch`'s checkpoint (write_test_set),
    built once per (checkpoint, test images, settings, TEST_PAGE_ROWS); EvalCache.commit keeps
    only the current best's."""
    key = hashlib.sha256(
        (scores.digests[epoch] + scores.settings + f"pages{TEST_PAGE_ROWS}").encode()
    )
    name = f"test_set-{key.hexdigest()[:32]}"
    built = cache.find(name)
    if built is None:
        built = cache.new(name)
        write_test_set(built, scores.checkpoints[epoch], epoch, p, device, test)
    return built


def write_test_set(
    folder: Path, ckpt: Path, epoch: int, p: EvaluateParams, device: torch.device, test: EvalImages
) -> None:
    """`folder`/index.html (+ page_NNN.html): every test image with its translation and
    reconstruction by `ckpt`'s generators, both directions, TEST_PAGE_ROWS rows per direction per
    page, each image a link to its full-size PNG under `folder`/{AtoB,BtoA}/{real,fake,rec}/. A
    one-directional checkpoint (CUT): AtoB/{real,fake}/ alone."""
    G_A, G_B, _ = checkpoint.load_generators(ckpt, device)
    directions = {}
    ways = [("AtoB", test.names_A, test.A, G_A, G_B), ("BtoA", test.names_B, test.B, G_B, G_A)]
    with atomic_dir(folder) as tmp:
        for label, names, real, forward, back in ways if G_B is not None else ways[:1]:
            fake = translate(forward, real, p.batch_size, device)
            images = {"real": real, "fake": fake}  # a one-directional run (CUT) has no rec
            if back is not None:
                images["rec"] = translate(back, fake, p.batch_size, device)
            for kind, batch in images.items():
                (tmp / label / kind).mkdir(parents=True)
                for name, img in zip(names, batch):
                    (tmp / label / kind / name).write_bytes(
                        png_bytes(Image.fromarray(img.permute(1, 2, 0).numpy()))
                    )
            directions[label] = names
        kinds = TEST_SET_KINDS if G_B is not None else TEST_SET_KINDS[:2]
        for name, page in pages_for_test_set(
            epoch, ckpt, directions, TEST_PAGE_ROWS, kinds
        ).items():
            (tmp / name).write_text(page)
