"""Run by torchrun in tests/test_ddp.py (one copy per rank): the pieces the DDP tests compare.

    python -m torch.distributed.run ... -m tests.ddp_worker DATA OUT PART[,PART...]

PART `equivalence`: 5 float64 steps of train_step on DistributedDataParallel networks, rank r
taking sample 2k + r at step k (batch 1 each), pool off; after every step the ranks' weights are
gathered and compared; rank 0 writes OUT/equivalence.pt (final weights, and whether the ranks
matched after every step). PART `straight`: the train stage for 2 epochs into OUT/straight.
PART `resumed`: the same run stopped after epoch 1, then resumed, into OUT/resumed. PART `gather`:
each rank's state as TrainState.save gathers it (a pool midway through its prepared draws, and its
random stream) through Rank.gather; rank 0 writes OUT/gathered.json: per rank and leaf, the tensor's
device and the bytes of its storage against its own. PART `cut`: the train stage with train.model cut
(CUT_TINY) for 2 epochs into OUT/cut_straight, and stopped after epoch 1 then resumed into
OUT/cut_resumed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from stages.train import TrainParams, train
from unpaired import distributed
from unpaired.models.cyclegan import build_models, distribute, optimizers, train_step
from unpaired.models.pool import ImagePool

TINY = TrainParams(
    epochs=1,
    epochs_decay=1,
    ngf=4,
    ndf=4,
    n_blocks=1,
    load_size=28,
    crop_size=24,
    samples=2,
    pool_size=3,
    devices=2,
)

CUT_TINY = replace(
    TINY, model="cut", pool_size=50, nce_layers=(0, 4, 8, 12), num_patches=16, netF_nc=16
)


def samples(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.rand(n, 3, 24, 24, generator=g, dtype=torch.float64) * 2 - 1,
        torch.rand(n, 3, 24, 24, generator=g, dtype=torch.float64) * 2 - 1,
    )


def flat(models) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for net in models.nets() for p in net.parameters()])


def equivalence(rank: distributed.Rank, out: Path) -> None:
    torch.manual_seed(0)
    m = build_models(4, 4, 1, 3, torch.device("cpu"), False, dtype=torch.float64)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    m = distribute(m, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    a, b = samples()
    identical, grads = [], None
    for k in range(5):
        i = 2 * k + rank.rank
        train_step(
            m,
            opt_G,
            opt_D,
            ImagePool(0, g),
            ImagePool(0, g),
            a[i : i + 1],
            b[i : i + 1],
            10.0,
            0.5,
            contextlib.nullcontext,
        )
        if grads is None:  # the first step's averaged gradients (Adam would hide a wrong scale)
            grads = [p.grad.clone() for net in m.nets() for p in net.parameters()]
        mine = flat(m)
        every = [torch.empty_like(mine) for _ in range(rank.world_size)]
        dist.all_gather(every, mine)
        identical.append(all(torch.equal(every[0], x) for x in every))
    if rank.main:
        torch.save(
            {
                "nets": {n: getattr(m, n).state_dict() for n in ("G_A", "G_B", "D_A", "D_B")},
                "identical": identical,
                "grads": grads,
            },
            out / "equivalence.pt",
        )


def gather(rank: distributed.Rank, out: Path) -> None:
    g = torch.Generator().manual_seed(rank.rank)
    pool = ImagePool(3, g)
    pool.prepare(5)
    pool.query(torch.rand(2, 3, 4, 4, generator=g))  # 3 of the 5 prepared draws left: views
    got = rank.gather({"pool_A": pool.state(), "pool": g.get_state()})
    if rank.main:
        leaves = [
            [
                {
                    "key": f"{k}.{j}" if isinstance(v, dict) else k,
                    "device": t.device.type,
                    "storage": t.untyped_storage().nbytes(),
                    "own": t.numel() * t.element_size(),
                }
                for k, v in state.items()
                for j, t in (v.items() if isinstance(v, dict) else [("", v)])
            ]
            for state in got
        ]
        (out / "gathered.json").write_text(json.dumps(leaves))


def main() -> None:
    data, out, parts = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    rank = distributed.from_env()
    distributed.init(rank, torch.device("cpu"))
    try:
        if "gather" in parts:
            gather(rank, out)
        if "equivalence" in parts:
            equivalence(rank, out)
        if "straight" in parts:
            train(TINY, data, out / "straight", out / "live_straight", rank=rank)
        if "resumed" in parts:
            train(TINY, data, out / "resumed", out / "live_resumed", stop_after=1, rank=rank)
            train(TINY, data, out / "resumed", out / "live_resumed", rank=rank)
        if "cut" in parts:
            train(CUT_TINY, data, out / "cut_straight", out / "live_cut_straight", rank=rank)
            resumed, live = out / "cut_resumed", out / "live_cut_resumed"
            train(CUT_TINY, data, resumed, live, stop_after=1, rank=rank)
            train(CUT_TINY, data, resumed, live, rank=rank)
    finally:
        distributed.finish(rank)


if __name__ == "__main__":
    main()
