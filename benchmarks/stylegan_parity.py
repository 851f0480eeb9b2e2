"""Parity of unpaired/sources/stylegan2.py + safe_pickle.py with the official StyleGAN2-ADA code.

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2-official   # outside this repo
    uv run python benchmarks/stylegan_parity.py --official /tmp/sg2-official

Builds small official Generators with random weights (one fp32, one with fp16 blocks and a conv
clamp), perturbs every parameter and buffer (the official init leaves biases, noise strengths and
w_avg at zero), pickles each the way the official training loop writes snapshots (its persistence
module embeds the source), loads that pickle with this project's restricted unpickler (no source
run), and compares the two generators' float outputs for several seeds, psi values and noise modes
on CPU in fp32 (`random` noise: the same torch seed before each call, as both draw one randn per
layer in the same order). Prints the max abs difference per case; exits 1 above --tol (1e-3).
The official code runs only here, from the checkout you give; nothing of it is part of this project.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from unpaired.safe_pickle import load_generator
from unpaired.sources.stylegan2 import seed_latents

VARIANTS = {
    "fp32": dict(num_fp16_res=0, conv_clamp=None),
    "fp16 blocks + clamp (run with force_fp32)": dict(num_fp16_res=2, conv_clamp=256),
}


def official_snapshot(root: Path, synthesis: dict, path: Path):
    sys.path.insert(0, str(root))
    from training.networks import Generator  # noqa: PLC0415 - the official checkout

    torch.manual_seed(0)
    G = Generator(
        z_dim=32,
        c_dim=0,
        w_dim=32,
        img_resolution=32,
        img_channels=3,
        mapping_kwargs={"num_layers": 2},
        synthesis_kwargs={"channel_base": 1024, "channel_max": 64, **synthesis},
    ).eval()
    with torch.no_grad():
        for t in list(G.parameters()) + list(G.buffers()):
            if t.dtype.is_floating_point and t.ndim > 0 and t.shape != (4, 4):  # not the filters
                t.add_(0.2 * torch.randn_like(t))
            elif t.dtype.is_floating_point and t.ndim == 0:
                t.add_(0.2 * torch.randn(()))
    G_ema = copy.deepcopy(G).requires_grad_(False)
    with open(path, "wb") as f:
        pickle.dump({"G": G, "D": None, "G_ema": G_ema, "augment_pipe": None}, f)
    return G_ema


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--official", type=Path, required=True, help="checkout of NVlabs/stylegan2-ada-pytorch"
    )
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, synthesis in VARIANTS.items():
            path = Path(tmp) / "net.pkl"
            official = official_snapshot(args.official, synthesis, path)
            ours = load_generator(path)
            print(f"{name}: {path.stat().st_size:,} byte pickle loaded without running its source")
            for seed in (0, 1, 7, 42):
                for psi in (1.0, 0.7, 0.5):
                    diffs = []
                    for mode in ("const", "none", "random"):
                        z = torch.from_numpy(np.random.RandomState(seed).randn(1, 32))
                        assert torch.equal(z, seed_latents([seed], 32))
                        with torch.no_grad():
                            torch.manual_seed(1234)
                            a = official(
                                z, None, truncation_psi=psi, noise_mode=mode, force_fp32=True
                            )
                            torch.manual_seed(1234)
                            b = ours(z, psi, noise_mode=mode)
                        diffs.append((a - b).abs().max().item())
                    worst = max(worst, *diffs)
                    print(
                        f"  seed {seed:2d} psi {psi}: max |official - ours| const {diffs[0]:.2e}  "
                        f"none {diffs[1]:.2e}  random {diffs[2]:.2e}"
                    )
    print(f"worst case: {worst:.2e} (tolerance {args.tol:.0e})")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
