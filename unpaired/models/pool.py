"""The image pool: a history of generated images for the discriminators (Shrivastava et al. 2017),
as the reference CycleGAN keeps it (`pool_size` 50)."""

from __future__ import annotations

import torch


class ImagePool:
    """The history buffer of generated images (Shrivastava et al.) as the reference uses it: until
    `size` images are stored, each new image is stored and returned; after that, with probability
    1/2 a random stored image is returned and replaced by the new one, else the new one is returned.
    Images of a batch are taken one after the other, as the reference does.

    Storage grows as images arrive, as the reference's list does: a buffer on the images' device
    whose capacity doubles when it is full, up to `size` (so `train.pool_size: 1000000000` costs
    only the images actually stored). The stored count is known on the host without reading the
    device (it only grows by one per image until `size`), so filling needs no device read; once
    full, the swap decision stays on the device (`torch.where` on the drawn uniform), so a query
    never reads a value back to the host. The random draws are made ahead on the CPU `generator`:
    `prepare(n)` draws the next `n` queries' randomness in one go (the stage calls it once per epoch,
    like the crops); a query past the prepared draws draws what it needs itself. Two draws per
    image, even while filling. Reproducible and resumable: `state()`/`load()`."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size = size
        self.generator = generator
        self.buffer: torch.Tensor | None = None  # capacity×C×H×W once the first image arrives
        self.stored = 0  # images stored (<= size, <= capacity)
        self._u = torch.empty(0)  # per-image uniform draw in [0, 1)
        self._index = torch.empty(0, dtype=torch.long)  # per-image slot draw in [0, size)

    def prepare(self, n: int, device: torch.device | None = None) -> None:
        """Draw the randomness of the next `n` images (two draws per image, even while filling)."""
        if self.size == 0:
            return
        u = torch.rand(n, generator=self.generator)
        index = torch.randint(self.size, (n,), generator=self.generator)
        device = device if device is not None else self._u.device
        self._u = torch.cat([self._u.to(device), u.to(device)])
        self._index = torch.cat([self._index.to(device), index.to(device)])

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        """Make the buffer hold at least `needed` images (capacity doubling, at most `size`)."""
        capacity = 0 if self.buffer is None else len(self.buffer)
        if needed <= capacity:
            return
        grown = like.new_zeros((min(self.size, max(needed, 2 * capacity)), *like.shape[1:]))
        if self.buffer is not None:
            grown[:capacity] = self.buffer
        self.buffer = grown

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """images: B×C×H×W (any float dtype) → B×C×H×W, each image the new one or a stored one."""
        images = images.detach()
        if self.size == 0:
            return images
        if len(self._u) < len(images):
            self.prepare(len(images) - len(self._u), images.device)
        u, index = self._u[: len(images)], self._index[: len(images)]
        self._u, self._index = self._u[len(images) :], self._index[len(images) :]
        filling = min(len(images), self.size - self.stored)  # the first `filling` images are stored
        if filling:
            self._reserve(self.stored + filling, images)
            self.buffer[self.stored : self.stored + filling] = images[:filling]
            self.stored += filling
        out = [images[:filling]] if filling else []
        for i in range(filling, len(images)):
            new = images[i : i + 1]
            slot = index[i : i + 1]
            swap = u[i] > 0.5
            old = self.buffer.index_select(0, slot)
            out.append(torch.where(swap, old, new))
            self.buffer.index_copy_(0, slot, torch.where(swap, new, old).to(self.buffer.dtype))
        return torch.cat(out, 0) if len(out) > 1 else out[0]

    @property
    def images(self) -> list[torch.Tensor]:
        """The stored images, 1×C×H×W each (for tests and checkpoints)."""
        if self.buffer is None:
            return []
        return list(self.buffer[: self.stored].split(1))

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "images": self.buffer[: self.stored].clone() if self.stored else torch.empty(0),
            "u": self._u.cpu(),
            "index": self._index.cpu(),
        }

    def load(self, state, device: torch.device) -> None:
        """From `state()`; also accepts the list of 1×C×H×W images older checkpoints hold."""
        if isinstance(state, list):
            state = {"images": torch.cat(state) if state else torch.empty(0)}
        images = state["images"]
        self._u = state.get("u", torch.empty(0)).to(device)
        self._index = state.get("index", torch.empty(0, dtype=torch.long)).to(device)
        self.buffer, self.stored = None, 0
        if len(images):
            images = images[: self.size].to(device)
            self._reserve(len(images), images)
            self.buffer[: len(images)] = images
            self.stored = len(images)
