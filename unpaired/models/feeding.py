"""The training images: where they live (`train.data_device`) and the feeders that cut each step's
batch out of them. Every place gives the same batches, bit for bit, for the same plan:

- `device`: all images decoded once into one uint8 tensor N×3×L×L on the training device (L =
  `load_size`), image by image (on CUDA the host holds one image at a time): no per-step decode and
  no host-to-device copy of pixels;
- `host` (CUDA only): the same tensor decoded straight into pinned host memory; each batch's whole
  images are gathered into one of two reused pinned buffers (HostBuffers) and copied to the GPU
  asynchronously, one batch ahead;
- `disk`: nothing decoded up front; each batch's images are read from the prepared folder and
  resized one batch ahead in a background thread, into the same kind of reused (pinned, on CUDA)
  buffers, and copied to the device from the main thread, so memory stays at a few batches
  whatever the image count;
- `auto`: `device` when the images fit a share of the memory they would live in, else `host`
  (CUDA), else `disk`; `place_images` says which and why in one line, counting each place's peak
  host memory.

Decoded images take 3·L² bytes each: 10,000 images at L = 286 are 2.3 GiB per domain.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from unpaired.errors import UserError
from unpaired.images import Skip, read_uint8, resize

if TYPE_CHECKING:
    from unpaired.models.training import TrainParams

SUFFIXES = (".png", ".jpg", ".jpeg")
DEVICE_SHARE = 0.25  # of a GPU's free memory, for `auto`: the rest is the models' and activations'
HOST_SHARE = 0.5  # of the host's available memory, for `auto` (shared by this node's processes)
HOST_BUFFERS = (
    2  # reused host buffers per domain (HostBuffers): one batch copying, one being filled
)


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files of `folder`, sorted by name. Raises UserError when there are none."""
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
        if folder.is_dir()
        else []
    )
    if not files:
        raise UserError(
            f"{folder}: no training images; run the prepare stage (uv run dvc repro prepare)"
        )
    return files


def decode(path: Path, load_size: int) -> torch.Tensor:
    """One prepared image as uint8 3×load×load, resized with antialiasing (once, as the reference's
    per-step Resize would do every time). Raises UserError naming the file if it cannot be decoded."""
    try:
        img = read_uint8(path)
    except Skip as skip:
        raise UserError(
            f"{path}: {skip.reason} image in the prepared data; re-run prepare "
            f"(uv run dvc repro prepare --force)"
        ) from None
    return resize(img, load_size)


def decoded_bytes(count: int, load_size: int) -> int:
    """Bytes of `count` decoded images: count × 3 × load_size² (uint8)."""
    return count * 3 * load_size * load_size


def load_folder(
    folder: Path | list[Path], load_size: int, device: torch.device | None = None, pin: bool = False
) -> torch.Tensor:
    """All images of `folder` (or the given files) as one uint8 tensor N×3×load×load on `device`
    (default: the CPU; `pin`: in pinned host memory, which needs CUDA), decoded one by one into a
    tensor allocated once: peak host memory is the tensor plus one image on the CPU, one image on
    a GPU. Raises UserError for an empty folder or an undecodable image."""
    files = image_files(folder) if isinstance(folder, Path) else folder
    out = torch.empty(
        len(files), 3, load_size, load_size, dtype=torch.uint8, device=device, pin_memory=pin
    )
    for i, f in enumerate(files):
        out[i] = decode(f, load_size)
    return out


@dataclass(frozen=True)
class Placement:
    """Where the training images live: `place` is device, host or disk; `device` the torch device
    holding the decoded tensor (None for disk); `why` the stage's log line."""

    place: str
    device: torch.device | None
    why: str


def place_images(
    setting: str,
    device: torch.device,
    nbytes: int,
    processes: int = 1,
    available: int | None = None,
    free: int | None = None,
    batch_bytes: int = 0,
) -> Placement:
    """Where `nbytes` of decoded images go for `train.data_device` = `setting` (auto, device, host or
    disk) when training on `device`. `processes`: training processes on this node, each holding its
    own copy; `available`: the host's available memory in bytes (default: psutil's figure); `free`:
    the GPU's free memory (default: torch.cuda.mem_get_info); `batch_bytes`: one step's decoded
    images of both domains (the feeders' buffers: HOST_BUFFERS of them). Memory is bounded either
    way: `auto` decodes into memory only within DEVICE_SHARE of the GPU's free memory or HOST_SHARE
    of the host's available memory (split among `processes`), else streams from disk; an explicit
    `device` or `host` that would not fit the memory it names raises UserError naming
    train.data_device. Peak host memory counted per place: `device` on CUDA one image (decoded
    image by image onto the GPU), on the CPU the images; `host` the images (decoded straight into
    pinned memory) plus the pinned batch buffers; `disk` its batch buffers (not checked)."""
    gib = nbytes / 2**30
    size = f"{gib:.2f} GiB of decoded images"
    if setting == "disk":
        return Placement(
            "disk",
            None,
            f"{size} read from disk each step, one batch ahead (train.data_device: disk)",
        )
    cuda = device.type == "cuda"
    in_host = (
        nbytes + HOST_BUFFERS * batch_bytes if cuda else nbytes
    )  # images in host memory, at peak
    host_left = (psutil.virtual_memory().available if available is None else available) / processes
    if cuda:
        gpu_free = torch.cuda.mem_get_info(device)[0] if free is None else free
    if setting == "device" and cuda and nbytes > gpu_free:
        raise UserError(
            f"params.yaml: train.data_device: device: {size} do not fit {device}'s "
            f"{gpu_free / 2**30:.1f} GiB free; use host or disk (or auto)"
        )
    if setting == "host" or (setting == "device" and not cuda):
        if in_host > host_left:
            raise UserError(
                f"params.yaml: train.data_device: {setting}: {size} do not fit the "
                f"{host_left / 2**30:.1f} GiB of host memory available to each of {processes} "
                f"process(es); use disk (or auto)"
            )
    if setting == "device":
        return Placement("device", device, f"{size} on {device} (train.data_device: device)")
    if setting == "host":
        if not cuda:
            return Placement(
                "device",
                device,
                f"{size} in memory (train.data_device: host; on "
                f"{device.type} host memory is the device's)",
            )
        return Placement(
            "host", torch.device("cpu"), f"{size} in pinned host memory (train.data_device: host)"
        )
    # auto
    if cuda and nbytes <= DEVICE_SHARE * gpu_free:
        return Placement(
            "device",
            device,
            f"{size} on {device}: within {DEVICE_SHARE:.0%} of its "
            f"{gpu_free / 2**30:.1f} GiB free (train.data_device: auto)",
        )
    where = "pinned host memory" if cuda else "memory"
    if in_host <= HOST_SHARE * host_left:
        return Placement(
            "host" if cuda else "device",
            torch.device("cpu") if cuda else device,
            f"{size} in {where}: within {HOST_SHARE:.0%} of the {host_left / 2**30:.1f} GiB "
            f"available{' to each process' if processes > 1 else ''} (train.data_device: auto)",
        )
    return Placement(
        "disk",
        None,
        f"{size} read from disk each step: over {HOST_SHARE:.0%} of the "
        f"{host_left / 2**30:.1f} GiB of host memory available"
        f"{' to each process' if processes > 1 else ''} (train.data_device: auto)",
    )


class HostBuffers:
    """`slots` reused host buffers for the batches a feeder copies to the device (one HostBuffers per
    domain), taken in turn. Pinned (`pin`, CUDA) so that the copy is asynchronous: a pageable
    source would be staged through a pinned copy of its own, every batch. A buffer is taken again
    only once the copy that last read it has finished: `release(slot, fence)` after issuing that
    copy, with a torch.cuda.Event recorded behind it (None: the copy was synchronous); `take` waits
    on the slot's fence. With two slots, one buffer is filled while the other's copy runs.
    `allocations` counts the buffers allocated (once per slot, again only for a larger batch)."""

    def __init__(self, slots: int = HOST_BUFFERS, pin: bool = False):
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.fences: list = [None] * slots
        self.allocations = 0
        self._next = 0

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8
    ) -> tuple[int, torch.Tensor]:
        """(slot, buffer): the next slot's buffer as `shape`, once its last copy has finished."""
        slot = self._next
        self._next = (slot + 1) % len(self.buffers)
        if self.fences[slot] is not None:
            self.fences[slot].synchronize()
            self.fences[slot] = None
        buf = self.buffers[slot]
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
            buf = self.buffers[slot] = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
            self.allocations += 1
        return slot, buf[: shape[0]]

    def release(self, slot: int, fence) -> None:
        """The copy reading `slot`'s buffer is issued; `fence.synchronize()` returns once it is done."""
        self.fences[slot] = fence


def copy_fence(device: torch.device):
    """A torch.cuda.Event recorded on `device`'s current stream (behind the copies issued so far),
    or None off CUDA, where copies to the device are synchronous."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class DeviceFeeder:
    """Batches for one epoch, drawn on the CPU generator up front (indices, crop offsets, flips: a
    few small tensors per epoch), then cut out of the uint8 images on the training device.

    Images on the device (`data_device` None or equal to `device`): no per-step decode and no
    host-to-device copy of pixels. Images on the host (`data_device` cpu, training on CUDA): they
    sit in pinned memory; each batch's whole images are gathered into a reused pinned buffer
    (HostBuffers), copied asynchronously (one batch ahead) and cropped on the device.

    Every batch is full: the epoch plan is padded by wrapping to a multiple of world_size ×
    batch_size (as torch's DistributedSampler pads), so the step's shapes never change and a
    compiled step (or a CUDA graph, or cuDNN's autotuning) never meets a short last batch. Data
    parallel (`world_size` > 1): every rank draws the same plan and takes its share of every
    global batch: rank r's step k is global samples [(k·W + r)·b, (k·W + r + 1)·b). The ranks
    together make one epoch of max(|A|, |B|) images (plus the padding)."""

    def __init__(
        self,
        images_a: torch.Tensor,
        images_b: torch.Tensor,
        crop: int,
        flip: bool,
        batch_size: int,
        device: torch.device,
        channels_last: bool,
        data_device: torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        copy_per_batch: bool | None = None,
    ):
        self.device = device
        self.data_device = device if data_device is None else data_device
        # Copy each batch's whole images to `device` (None: when the images live elsewhere; True
        # on the CPU runs that path in tests, pinning and the asynchronous copy aside).
        self.host = self.data_device != device if copy_per_batch is None else copy_per_batch
        self.a = images_a.to(self.data_device)
        self.b = images_b.to(self.data_device)
        pin = self.host and device.type == "cuda"
        if pin:  # feeder_for decodes them straight into pinned memory (load_folder): no second copy
            self.a, self.b = (x if x.is_pinned() else x.pin_memory() for x in (self.a, self.b))
        self.buffers = (HostBuffers(pin=pin), HostBuffers(pin=pin))
        self._sampling(
            len(self.a),
            len(self.b),
            self.a.shape[-1],
            crop,
            flip,
            batch_size,
            channels_last,
            rank,
            world_size,
        )

    def _sampling(
        self,
        count_a: int,
        count_b: int,
        load: int,
        crop: int,
        flip: bool,
        batch_size: int,
        channels_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        """What `plan` and `batches` need besides the images, for every feeder."""
        self.count_a, self.count_b, self.load = count_a, count_b, load
        self.crop, self.flip, self.batch_size = crop, flip, batch_size
        self.rank, self.world_size = rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(max(self.count_a, self.count_b) / (self.batch_size * self.world_size))

    @property
    def images_per_epoch(self) -> int:
        """Images this rank takes per epoch (full batches: see the class docstring)."""
        return self.steps_per_epoch * self.batch_size

    def plan(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """The reference's sampling: A in a shuffled order over max(|A|, |B|) (wrapping), B at
        random; padded to full batches, then this rank's share (see the class docstring)."""
        n = max(self.count_a, self.count_b)
        plan = {
            "a": torch.randperm(n, generator=g) % self.count_a,
            "b": torch.randint(self.count_b, (n,), generator=g),
            "offsets": torch.randint(self.load - self.crop + 1, (n, 2, 2), generator=g),
            "flips": (torch.rand((n, 2), generator=g) < 0.5) & self.flip,
        }
        b, w, steps = self.batch_size, self.world_size, self.steps_per_epoch
        order = torch.arange(steps * w * b) % n  # padded by wrapping
        mine = order.view(steps, w, b)[:, self.rank].reshape(-1)
        plan = {k: v[mine] for k, v in plan.items()}
        return {
            k: v.to(self._index_device if k in ("a", "b") else self.device) for k, v in plan.items()
        }

    @property
    def _index_device(self) -> torch.device:
        return self.data_device

    def _take(self, batch, offsets, flips) -> torch.Tensor:
        # Per-image crop windows: build the gather index once per batch (all on the device).
        ar = torch.arange(self.crop, device=self.device)
        rows = (offsets[:, 0, None] + ar)[:, :, None]  # B×crop×1
        cols = offsets[:, 1, None] + ar  # B×crop
        cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, :]  # B×1×crop
        b = torch.arange(len(batch), device=self.device)[:, None, None]
        crops = batch.permute(0, 2, 3, 1)[b, rows, cols]  # B×crop×crop×3
        out = crops.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return out.contiguous(memory_format=self.memory_format)

    def _whole(self, plan, sl):
        """This step's whole uint8 images (B×3×L×L) on the device: indexed there, or gathered on
        the host into a reused (pinned) buffer and copied without blocking."""
        if not self.host:
            return self.a[plan["a"][sl]], self.b[plan["b"][sl]]
        out = []
        for images, index, buffers in (
            (self.a, plan["a"][sl], self.buffers[0]),
            (self.b, plan["b"][sl], self.buffers[1]),
        ):
            slot, buf = buffers.take((len(index), *images.shape[1:]))
            torch.index_select(images, 0, index, out=buf)
            out.append(self._to_device(buffers, slot, buf))
        return tuple(out)

    def _to_device(self, buffers: HostBuffers, slot: int, buf: torch.Tensor) -> torch.Tensor:
        """`buf` copied to the device without blocking; its slot released behind the copy."""
        on_device = buf.to(self.device, non_blocking=True)
        buffers.release(slot, copy_fence(self.device))
        return on_device

    def _ready(self, ahead):
        """The pair `_whole` started (a Future in subclasses that work in the background)."""
        return ahead

    def batches(self, plan: dict[str, torch.Tensor]):
        """Yields (real_A, real_B) per step: float B×3×crop×crop in [-1, 1] on the device."""
        n = len(plan["a"])
        slices = [slice(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        ahead = self._whole(plan, slices[0]) if slices else None
        for i, sl in enumerate(slices):
            a, b = self._ready(ahead)
            if i + 1 < len(slices):
                ahead = self._whole(
                    plan, slices[i + 1]
                )  # next batch started before this step's work
            yield (
                self._take(a, plan["offsets"][sl, 0], plan["flips"][sl, 0]),
                self._take(b, plan["offsets"][sl, 1], plan["flips"][sl, 1]),
            )


class DiskFeeder(DeviceFeeder):
    """The DeviceFeeder's batches with nothing decoded up front (`train.data_device: disk`): each
    batch's images are read from `files_a` / `files_b` and resized to `load_size` (the same `decode`
    that loading into memory runs, so the batches are the same bits) in one background thread, one
    batch ahead of the step, into reused host buffers (HostBuffers: pinned on CUDA); the main
    thread copies them to the device without blocking (a pageable copy from the thread would wait
    for the default stream). Memory: two batches of uint8 images per domain, whatever the count."""

    def __init__(
        self,
        files_a: list[Path],
        files_b: list[Path],
        load_size: int,
        crop: int,
        flip: bool,
        batch_size: int,
        device: torch.device,
        channels_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.device, self.data_device, self.host = device, None, False
        self.files_a, self.files_b = list(files_a), list(files_b)
        pin = device.type == "cuda"
        self.buffers = (HostBuffers(pin=pin), HostBuffers(pin=pin))
        self._sampling(
            len(self.files_a),
            len(self.files_b),
            load_size,
            crop,
            flip,
            batch_size,
            channels_last,
            rank,
            world_size,
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    @property
    def _index_device(self) -> torch.device:
        return torch.device("cpu")

    def _decode_pair(self, ia: list[int], ib: list[int]) -> list[tuple[int, torch.Tensor]]:
        """(slot, host buffer) per domain, the batch's images decoded into it (background thread)."""
        out = []
        for files, index, buffers in (
            (self.files_a, ia, self.buffers[0]),
            (self.files_b, ib, self.buffers[1]),
        ):
            slot, buf = buffers.take((len(index), 3, self.load, self.load))
            for j, i in enumerate(index):
                buf[j] = decode(files[i], self.load)
            out.append((slot, buf))
        return out

    def _whole(self, plan, sl) -> Future:
        return self._pool.submit(self._decode_pair, plan["a"][sl].tolist(), plan["b"][sl].tolist())

    def _ready(self, ahead: Future):
        """The decoded pair copied to the device from this (the main) thread, without blocking."""
        return tuple(
            self._to_device(buffers, slot, buf)
            for (slot, buf), buffers in zip(ahead.result(), self.buffers)
        )


def feeder_for(
    p: TrainParams,
    files_a: list[Path],
    files_b: list[Path],
    device: torch.device,
    channels_last: bool,
    placement: Placement,
    rank,
) -> DeviceFeeder:
    """The feeder of a run with train params `p` for this `rank` (unpaired.distributed.Rank), with
    the images placed as `placement` says: decoded into memory now (device, host) or read per batch
    (disk). Raises UserError naming an image that cannot be decoded."""
    if placement.place == "disk":
        return DiskFeeder(
            files_a,
            files_b,
            p.load_size,
            p.crop_size,
            not p.no_flip,
            p.batch_size,
            device,
            channels_last,
            rank.rank,
            rank.world_size,
        )
    pin = placement.place == "host"  # pinned as decoded: no second, pageable copy
    images_a, images_b = (
        load_folder(files, p.load_size, placement.device, pin) for files in (files_a, files_b)
    )
    return DeviceFeeder(
        images_a,
        images_b,
        p.crop_size,
        not p.no_flip,
        p.batch_size,
        device,
        channels_last,
        placement.device,
        rank.rank,
        rank.world_size,
    )
