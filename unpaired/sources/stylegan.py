"""`stylegan` source: faces (or anything) synthesized by a pretrained StyleGAN2(-ADA) network.

`network` is an official stylegan2-ada-pytorch pickle (e.g. NVIDIA's FFHQ networks, licensed for
non-commercial use only) or a generator saved by unpaired, given as a path or a URL (downloaded once
into the domain's cache, checked against `sha256` when given). It is loaded by safe_pickle.py, which
never runs code from the file, into the plain-PyTorch generator of stylegan2.py (beside this file).

Seed s gives the latent RandomState(s).randn(z_dim), as the official generate.py draws it, so the
same seed and psi give the same face as the official tool. Images are synthesized in batches on
a GPU (one by one on a CPU, where that is faster), converted to 8 bits the way generate.py does, downscaled to `image_size` with antialiasing and written as
`seedNNNNN.png`. On CPU the output is deterministic to the byte and equals the official tool's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from unpaired.devices import check_device, resolve_device
from unpaired.errors import UserError
from unpaired.files import sha256_of
from unpaired.params import COUNT, IMAGE_SIZE, SEED, Bound, Params, check, fail, parse
from unpaired.sources.base import FetchContext, SourceError
from unpaired.sources.download import is_network_pickle, locate

FFHQ = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl"
WHERE_TO_GET = (
    f"e.g. NVIDIA's FFHQ network {FFHQ} (non-commercial licence), or a pickle trained "
    f"with stylegan2-ada-pytorch"
)


def parse_seeds(text: str | int, key: str) -> list[int]:
    """generate.py's syntax: "0-499" (inclusive), "1,5,9", or a mix like "0-9,100"."""
    seeds: list[int] = []
    for part in str(text).split(","):
        lo, _, hi = (
            part.strip().partition("-") if "-" in part.strip()[1:] else (part.strip(), "", "")
        )
        if not lo.isdigit() or not (hi.isdigit() or not hi):
            fail(key, f"expected seeds like '0-499' or '1,5,9', got {text!r}")
        if hi and int(hi) < int(lo):
            fail(key, f"range {part.strip()!r} ends before it starts")
        check(int(hi or lo) <= SEED.high, key, f"seeds must be in [0, 2**32), got {part.strip()!r}")
        check(
            len(seeds) + int(hi or lo) - int(lo) < COUNT.high,
            key,
            f"at most {COUNT.high:,} seeds (one image each: {COUNT.why}), got {text!r}",
        )
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    check(len(set(seeds)) == len(seeds), key, "lists a seed twice")
    check(all(0 <= s < 2**32 for s in seeds), key, "seeds must be in [0, 2**32)")
    return seeds


@dataclass(frozen=True)
class StyleGANParams(Params):
    network: str = ""  # path or http(s) URL of the network pickle
    sha256: str | None = None  # optional checksum of the network file
    seeds: str | int = "0-99"  # which latents: "0-499", "1,5,9" (one image per seed)
    truncation_psi: float = 0.7  # truncation towards the average face
    #: const, random (seeded per image) or none
    noise_mode: Literal["const", "random", "none"] = "const"
    batch_size: int = 16  # images per pass on a GPU (a CPU goes one by one)
    image_size: int = 256  # output side in pixels (downscaled with antialiasing)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    #: auto: the network's fp16 layers on CUDA; fp32: fp32 everywhere
    precision: Literal["auto", "fp32"] = "auto"
    #: recorded in the manifest
    licence: str = "NVIDIA Source Code License-NC (non-commercial) for NVIDIA's networks"

    BOUNDS = {
        "seeds": SEED,
        "truncation_psi": Bound(2, "truncation towards the average; 0.7 is usual", -1),
        "batch_size": Bound(1024, "images per pass on a GPU"),
        "image_size": IMAGE_SIZE,
    }

    def validate(self, prefix: str) -> None:
        check(
            bool(self.network),
            f"{prefix}.network",
            f"required: a StyleGAN2-ADA network pickle (path or URL), {WHERE_TO_GET}",
        )
        parse_seeds(self.seeds, f"{prefix}.seeds")
        check(
            -1.0 <= self.truncation_psi <= 2.0,
            f"{prefix}.truncation_psi",
            f"must be in [-1, 2] (0.7 is usual), got {self.truncation_psi}",
        )
        check(self.batch_size > 0, f"{prefix}.batch_size", f"must be > 0, got {self.batch_size}")
        check(self.image_size >= 8, f"{prefix}.image_size", f"must be >= 8, got {self.image_size}")
        check(
            self.sha256 is None or len(self.sha256) == 64,
            f"{prefix}.sha256",
            "must be 64 hex digits",
        )
        check_device(self.device, f"{prefix}.device")


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    # torch and the network code are imported here, when a stylegan domain is fetched: the fetch
    # stage imports every source module, and a procedural source should not pay torch's import
    # (hundreds of MB of RSS and seconds of start-up per fetch).
    import torch

    from unpaired.safe_pickle import load_generator
    from unpaired.sources.stylegan2 import seed_latents, to_uint8

    p = parse(StyleGANParams, raw, ctx.key)
    seeds = parse_seeds(p.seeds, f"{ctx.key}.seeds")
    device = resolve_device(p.device, f"{ctx.key}.device")
    path = locate(
        p.network,
        ctx.cache_dir,
        key=f"{ctx.key}.network",
        sha256=p.sha256,
        timeout=120,
        missing=f"not found; give a StyleGAN2-ADA network pickle path or URL, {WHERE_TO_GET}",
        check=is_network_pickle,
    )
    digest = sha256_of(path)
    try:
        G = load_generator(path).to(device)
    except UserError as err:
        raise SourceError(f"{ctx.key}.network: {err}") from None
    # On a GPU, batches; on a CPU one image per pass, in the official (grouped-convolution) form:
    # there, batching is slower (memory-bound: benchmarks/stylegan.py) and this form is the official
    # tool's own arithmetic, so CPU output equals its output to the bit.
    per_pass = 1 if device.type == "cpu" else p.batch_size
    rows = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(seeds), per_pass):
            batch = seeds[i : i + per_pass]
            z = seed_latents(batch, G.z_dim).float().to(device)
            # One noise generator per image, seeded by its seed: the noise of an image does not
            # depend on the batch it falls in (the official tool draws from the global RNG).
            gens = None
            if p.noise_mode == "random":
                gens = [torch.Generator(device=device).manual_seed(s) for s in batch]
            images = G(
                z,
                p.truncation_psi,
                noise_mode=p.noise_mode,
                fused=per_pass == 1,
                allow_fp16=p.precision == "auto",
                generator=gens,
            )
            for seed, img in zip(batch, to_uint8(images).cpu().numpy()):
                im = Image.fromarray(img)
                if im.size != (p.image_size, p.image_size):
                    im = im.resize((p.image_size, p.image_size), Image.Resampling.LANCZOS)
                name = f"seed{seed:05d}.png"
                im.save(ctx.out_dir / name, compress_level=6)
                rows.append(
                    {
                        "file": name,
                        "source": "stylegan",
                        "origin": f"{path.name}@sha256:{digest[:16]}#seed={seed},"
                        f"psi={p.truncation_psi},noise={p.noise_mode}",
                        "licence": p.licence,
                    }
                )
    print(
        f"{ctx.key}: {len(rows)} images from {path.name} on {device} "
        f"({len(rows) / (time.perf_counter() - start):.1f} images/s)"
    )
    return rows
