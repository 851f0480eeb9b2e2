"""Where the training images live (train.data_device) and the feeders that cut batches out of them:
every place gives the same batches and the same trained weights; memory stays bounded."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from stages.train import train
from tests.test_train import TINY, make_prepared, same, weights
from unpaired.errors import UserError
from unpaired.models.feeding import (
    DeviceFeeder,
    DiskFeeder,
    HostBuffers,
    decoded_bytes,
    image_files,
    load_folder,
    place_images,
)

CPU = torch.device("cpu")
GIB = 2**30


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_images_read_from_disk_give_the_same_batches(tmp_path, rank, world_size):
    """DiskFeeder decodes each batch in a background thread, one ahead: the same bits as decoding
    every image up front, for a plain run and for one rank's share of a data-parallel run."""
    data = make_prepared(tmp_path / "prepared", n=(7, 5), size=30)
    files_a, files_b = image_files(data / "trainA"), image_files(data / "trainB")
    memory = DeviceFeeder(
        load_folder(files_a, 28),
        load_folder(files_b, 28),
        24,
        True,
        2,
        CPU,
        False,
        rank=rank,
        world_size=world_size,
    )
    disk = DiskFeeder(
        files_a, files_b, 28, 24, True, 2, CPU, False, rank=rank, world_size=world_size
    )
    assert (disk.steps_per_epoch, disk.images_per_epoch) == (
        memory.steps_per_epoch,
        memory.images_per_epoch,
    )
    for epoch in range(2):
        one = list(memory.batches(memory.plan(torch.Generator().manual_seed(epoch))))
        two = list(disk.batches(disk.plan(torch.Generator().manual_seed(epoch))))
        assert len(one) == len(two) == memory.steps_per_epoch
        assert all(torch.equal(x, y) for p, q in zip(one, two) for x, y in zip(p, q))


def test_training_from_disk_gives_the_same_weights(tmp_path):
    data = make_prepared(tmp_path / "prepared")
    train(replace(TINY, data_device="device"), data, tmp_path / "memory", tmp_path / "l1")
    train(replace(TINY, data_device="disk"), data, tmp_path / "disk", tmp_path / "l2")
    assert same(weights(tmp_path / "memory" / "last.pt"), weights(tmp_path / "disk" / "last.pt"))


def test_a_damaged_image_read_from_disk_is_named(tmp_path):
    data = make_prepared(tmp_path / "prepared")
    bad = sorted((data / "trainB").iterdir())[1]
    bad.write_bytes(b"not a png")
    with pytest.raises(
        UserError, match=rf"{bad.name}: .* image in the prepared data; re-run prepare"
    ):
        train(replace(TINY, data_device="disk"), data, tmp_path / "ckpt", tmp_path / "live")


def test_auto_decodes_into_memory_only_within_its_share():
    n = decoded_bytes(10_000, 286)
    assert n == 10_000 * 3 * 286 * 286  # 2.3 GiB
    fits = place_images("auto", CPU, n, available=8 * GIB)
    assert fits.place == "device" and fits.device == CPU
    assert fits.why == (
        "2.29 GiB of decoded images in memory: within 50% of the 8.0 GiB available "
        "(train.data_device: auto)"
    )
    streamed = place_images("auto", CPU, n, available=4 * GIB)
    assert (
        streamed.place == "disk"
        and streamed.device is None
        and "read from disk each step" in streamed.why
    )
    # 4 processes on the node, each with its own copy: each gets a quarter of the memory
    assert place_images("auto", CPU, n, processes=4, available=16 * GIB).place == "disk"
    assert place_images("auto", CPU, n, processes=2, available=16 * GIB).place == "device"


def test_an_explicit_place_that_does_not_fit_is_one_line_naming_the_key():
    n = decoded_bytes(10_000, 286)
    with pytest.raises(
        UserError,
        match=r"^params.yaml: train.data_device: device: 2.29 GiB of decoded images "
        r"do not fit the 2.0 GiB of host memory available to each of 1 "
        r"process\(es\); use disk \(or auto\)$",
    ):
        place_images("device", CPU, n, available=2 * GIB)
    assert (
        place_images("device", CPU, n, available=3 * GIB).place == "device"
    )  # asked for, and fits
    assert place_images("disk", CPU, 1, available=100 * GIB).place == "disk"  # asked for


def test_cuda_places_without_a_gpu():
    """The CUDA branches with the free GPU memory given: on the device within 25% of it, else pinned
    host memory within half of the host's, else disk; an explicit device that does not fit is refused."""
    cuda, n = torch.device("cuda"), decoded_bytes(10_000, 286)
    assert place_images("auto", cuda, n, available=64 * GIB, free=16 * GIB).place == "device"
    host = place_images("auto", cuda, n, available=64 * GIB, free=4 * GIB)
    assert host.place == "host" and host.device == CPU and "pinned host memory" in host.why
    assert place_images("auto", cuda, n, available=4 * GIB, free=4 * GIB).place == "disk"
    with pytest.raises(
        UserError, match=r"train.data_device: device: .* do not fit cuda's 2.0 GiB free"
    ):
        place_images("device", cuda, n, available=64 * GIB, free=2 * GIB)


def test_the_stage_says_where_the_images_are(tmp_path, capsys):
    data = make_prepared(tmp_path / "prepared")
    train(replace(TINY, data_device="disk"), data, tmp_path / "ckpt", tmp_path / "live")
    assert (
        "train: 0.00 GiB of decoded images read from disk each step, one batch ahead "
        "(train.data_device: disk)" in capsys.readouterr().out
    )


# --- reused host buffers (pinned on CUDA) --------------------------------------------------------


class CopyInFlight:
    """A copy running in another thread, standing for an asynchronous host-to-device copy: the
    fence HostBuffers waits on (synchronize(), as torch.cuda.Event's)."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        src: torch.Tensor,
        dst: torch.Tensor,
        started: threading.Event,
    ):
        def copy():
            started.set()
            time.sleep(0.3)
            dst.copy_(src)

        self.done = pool.submit(copy)

    def synchronize(self) -> None:
        self.done.result()


def test_host_buffers_are_reused_and_never_rewritten_while_a_copy_reads_them():
    buffers = HostBuffers()
    slot0, first = buffers.take((2, 3, 4, 4))
    slot1, second = buffers.take((2, 3, 4, 4))
    assert (slot0, slot1) == (0, 1) and first.data_ptr() != second.data_ptr()
    slot, again = buffers.take((1, 3, 4, 4))  # a shorter batch: the same buffer
    assert slot == 0 and again.data_ptr() == first.data_ptr() and again.shape == (1, 3, 4, 4)
    assert buffers.allocations == 2
    # A copy still reading slot 1's buffer: taking slot 1 again waits for it to finish.
    second.fill_(1)
    dst, started = torch.zeros(2, 3, 4, 4, dtype=torch.uint8), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        buffers.release(slot1, CopyInFlight(pool, second, dst, started))
        started.wait()
        buffers.release(0, None)
        slot, reused = buffers.take((2, 3, 4, 4))
        assert slot == 1 and reused.data_ptr() == second.data_ptr()
        reused.fill_(2)  # only now may it be refilled
    assert (dst == 1).all() and buffers.allocations == 2


def test_batches_copied_through_reused_buffers_are_todays(tmp_path):
    """Images on the host (copy per batch) and images read from disk go through two reused buffers
    per domain, allocated once, for every epoch and the short last batch; the batches are those cut
    from images on the device, bit for bit. The disk thread hands back host buffers: the copy to the
    device is the main thread's (on CUDA: pinned, without blocking)."""
    data = make_prepared(tmp_path / "prepared", n=(5, 4), size=30)
    files_a, files_b = image_files(data / "trainA"), image_files(data / "trainB")
    a, b = load_folder(files_a, 28), load_folder(files_b, 28)
    on_device = DeviceFeeder(a, b, 24, True, 2, CPU, False)
    on_host = DeviceFeeder(a, b, 24, True, 2, CPU, False, data_device=CPU, copy_per_batch=True)
    disk = DiskFeeder(files_a, files_b, 28, 24, True, 2, CPU, False)
    for epoch in range(2):
        want = list(on_device.batches(on_device.plan(torch.Generator().manual_seed(epoch))))
        for feeder in (on_host, disk):
            got = list(feeder.batches(feeder.plan(torch.Generator().manual_seed(epoch))))
            assert len(got) == len(want) == 3
            assert all(torch.equal(x, y) for p, q in zip(want, got) for x, y in zip(p, q))
    assert [x.allocations for f in (on_host, disk) for x in f.buffers] == [2, 2, 2, 2]
    plan = disk.plan(torch.Generator().manual_seed(0))
    decoded = disk._whole(plan, slice(0, 2)).result()
    owned = {buf.data_ptr() for x in disk.buffers for buf in x.buffers}
    assert [(t.device.type, t.data_ptr() in owned) for _, t in decoded] == [("cpu", True)] * 2


def test_auto_counts_the_pinned_batch_buffers():
    """On CUDA `host` pins the images plus two batch buffers per domain: a dataset that fits half
    the host's memory only without them is read from disk (auto) or refused (host)."""
    cuda = torch.device("cuda")
    n, batch = int(1.96 * GIB), decoded_bytes(2 * 64, 286)  # 0.03 GiB per step, both domains
    assert place_images("auto", cuda, n, available=4 * GIB, free=1 * GIB).place == "host"
    assert (
        place_images("auto", cuda, n, available=4 * GIB, free=1 * GIB, batch_bytes=batch).place
        == "disk"
    )
    with pytest.raises(
        UserError, match=r"train.data_device: host: 1.96 GiB of decoded images do not fit"
    ):
        place_images("host", cuda, n, available=int(1.99 * GIB), free=1 * GIB, batch_bytes=batch)
    # images on the GPU: decoded one by one onto it, the host holds one image at a time
    assert (
        place_images("auto", cuda, n, available=1 * GIB, free=16 * GIB, batch_bytes=batch).place
        == "device"
    )
