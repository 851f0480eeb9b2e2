"""What makes the train stage's whole process faster (issue 27) keeps its bytes: the resize and the
sample grid without torchvision, the writes off the training thread, the dvclive logs extended
rather than rewritten, the thread rule (all CPUs) and the wait policy chosen by the load."""

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from unpaired import checkpoint, threads
from unpaired.distributed import Rank
from unpaired.errors import UserError
from unpaired.images import resize
from unpaired.models.cyclegan import CycleGAN
from unpaired.models.live import RunLog, append_live, write_live
from unpaired.models.samples import grid, write_sample
from unpaired.models.state import TrainState
from unpaired.models.writer import Writer, detached

from .test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_resize_gives_torchvisions_bytes():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    for shape, size in (((3, 64, 64), 72), ((3, 50, 80), 64), ((2, 3, 31, 17), 24), ((3, 9, 9), 9)):
        image = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        want = TF.resize(image, [size, size], antialias=True)
        assert torch.equal(resize(image, size), want), shape
        floats = image.float() / 255
        assert torch.equal(resize(floats, size), TF.resize(floats, [size, size], antialias=True))
    last = torch.randint(0, 256, (1, 3, 40, 40), generator=g, dtype=torch.uint8)
    last = last.contiguous(memory_format=torch.channels_last)[0]  # a channels-last single image
    assert torch.equal(resize(last, 32), TF.resize(last, [32, 32], antialias=True))


def test_grid_gives_make_grids_bytes():
    from torchvision.utils import make_grid

    g = torch.Generator().manual_seed(1)
    for n, k in ((1, 3), (2, 3), (3, 3), (2, 2)):  # k images a row: CycleGAN 3, CUT 2
        rows_a = torch.randn(n, k, 3, 12, 12, generator=g) * 1.5  # beyond [-1, 1]: clamped
        rows_b = torch.randn(n, k, 3, 12, 12, generator=g)
        flat = torch.cat([rows_a, rows_b]).flatten(0, 1)
        want = make_grid(
            flat, nrow=k, padding=2, pad_value=1.0, normalize=True, value_range=(-1, 1)
        )
        want = want.mul(255).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(grid(rows_a, rows_b), want), (n, k)


def test_the_stage_imports_no_torchvision_or_pandas():
    """`import stages.train` and the device set-up leave out what takes seconds to import and the
    stage does not use: torchvision, pandas (and dvclive, which imports pandas, until the writer
    thread writes the logs)."""
    code = (
        "import sys, stages.train as t, torch\n"
        "from unpaired import params\n"
        "from unpaired.distributed import Rank\n"
        "p = params.parse(t.TrainParams, {'device': 'cpu', 'threads': 1}, 'train')\n"
        "t.setup_device(p, Rank())\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "print(sorted({m.split('.')[0] if m.startswith(('torchvision', 'pandas')) else m "
        "for m in sys.modules if m.startswith(('torchvision', 'pandas', 'dvclive'))}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[-1] == "[]", out


def test_auto_threads_is_the_machine_and_the_wait_policy_follows_the_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.auto_threads() == threads.cpu_count()
    assert threads.wait_policy_for(None) is None  # not measurable: OpenMP's default
    assert threads.wait_policy_for(0.2) is None
    assert threads.wait_policy_for(threads.BUSY_CPUS) == "PASSIVE"
    assert threads.wait_policy_for(1.0) == "PASSIVE"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "START", threads.Start(1.0, 2, "PASSIVE", "load"))
        note = threads.load_note("train.threads", "auto")
        assert note.startswith("note: other work is using 1.0 of the 2 CPUs") and (
            "train.threads: auto" in note and "train.threads: 1 may be faster" in note
        )
        monkeypatch.setattr(threads, "START", threads.Start(0.1, 2, None, "load"))
        assert threads.load_note("train.threads", "auto") is None  # idle: nothing to say
        torch.set_num_threads(1)
        monkeypatch.setattr(threads, "START", threads.Start(1.0, 2, "PASSIVE", "load"))
        assert threads.load_note("train.threads", 1) is None  # one thread: no team to wait
    finally:
        torch.set_num_threads(before)


def test_other_load_sees_a_busy_core():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = threads.other_load(0.3)
    finally:
        burner.kill()
        burner.wait()
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert busy >= 0.7, busy


STEPS = """
import hashlib, os, sys, torch
from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.pool import ImagePool
import contextlib
torch.set_num_threads(2)
torch.manual_seed(0)
m = build_models(8, 8, 1, 3, torch.device("cpu"), False)
opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
g = torch.Generator().manual_seed(0)
pools = ImagePool(3, g), ImagePool(3, g)
a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
for _ in range(3):
    train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext)
h = hashlib.sha256()
for net in m.nets():
    for v in net.state_dict().values():
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(os.environ["OMP_WAIT_POLICY"], h.hexdigest())
"""


@pytest.mark.skipif(threads.cpu_count() < 2, reason="needs 2 CPUs for a team of 2 threads")
def test_the_wait_policy_never_changes_the_trained_bytes():
    """The load chooses the wait policy, never the thread count: with 2 threads, spinning and
    passive waiting train the same weights, bit for bit."""
    digests = set()
    for policy in ("ACTIVE", "PASSIVE"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": policy}
        env.pop("OMP_NUM_THREADS", None)
        out = subprocess.run(
            [sys.executable, "-c", STEPS],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[0] == policy
        digests.add(out[1])
    assert len(digests) == 1


def test_writer_runs_in_order_and_raises_a_failure_on_join():
    done: list[int] = []
    w = Writer()
    w.submit(done.append, 1)
    w.submit(done.append, 2)
    w.join()
    assert done == [1, 2]

    def fail(_):
        raise UserError("disk full")

    w.submit(fail, 0)
    w.submit(done.append, 3)  # after a failed write: skipped
    with pytest.raises(UserError, match="disk full"):
        w.join()
    w.submit(done.append, 4)
    w.join()
    assert done == [1, 2, 4]
    w.submit(fail, 0)
    assert str(w.close()) == "disk full" and w.close() is None


def test_detached_copies_every_tensor():
    t = torch.ones(2, 2)
    state = {"a": [t, (t, 3)], "b": {"c": t}, "d": "x"}
    copy = detached(state)
    t.add_(1)
    assert copy["a"][0].sum() == 4 and copy["a"][1][0].sum() == 4 and copy["b"]["c"].sum() == 4
    assert copy["a"][1][1] == 3 and copy["d"] == "x"


def test_checkpoints_written_off_the_thread_have_the_same_bytes(tmp_path):
    """state.save through a writer, then training on: last.pt and the epoch file are the bytes a
    save on the training thread writes."""
    p = replace(TINY, pool_size=2)
    state = TrainState.new(CycleGAN, p, torch.device("cpu"), Rank(), ["trainA/x.png"], False)
    a = b = torch.zeros(1, 3, 24, 24)
    state.model.start_epoch(1)
    state.model.step(a, b, contextlib.nullcontext)
    state.epoch = 1
    sync, off = tmp_path / "sync", tmp_path / "off"
    sync.mkdir(), off.mkdir()
    w = Writer()
    state.save(off, w)
    state.model.step(a + 0.5, b, contextlib.nullcontext)  # changes the weights
    w.join()
    state2 = TrainState.new(CycleGAN, p, torch.device("cpu"), Rank(), ["trainA/x.png"], False)
    state2.model.start_epoch(1)
    state2.model.step(a, b, contextlib.nullcontext)
    state2.epoch = 1
    state2.save(sync)
    for name in ("last.pt", "epoch_001.pt"):
        assert (off / name).read_bytes() == (sync / name).read_bytes(), name
    checkpoint.load(off / "last.pt")


def _history(n: int) -> list[dict]:
    return [{"epoch": e, "metrics": {"G_A": 0.5 / e, "lr": 2e-4}} for e in range(1, n + 1)]


def _files(live: Path) -> dict[str, bytes]:
    return {
        f.relative_to(live).as_posix(): f.read_bytes()
        for f in sorted(live.rglob("*"))
        if f.is_file()
    }


def test_extended_logs_are_the_rewritten_logs(tmp_path):
    out = tmp_path / "out"
    for e in (1, 2, 3):
        write_sample(out, e, torch.full((3, 10, 8), 40 * e, dtype=torch.uint8))
    speeds = {1: 5.0, 2: 6.0, 3: 7.0}
    write_live(tmp_path / "whole", _history(3), speeds, out)
    write_live(tmp_path / "grown", _history(1), speeds, out)
    append_live(tmp_path / "grown", _history(2)[-1], 6.0, out)
    append_live(tmp_path / "grown", _history(3)[-1], 7.0, out)
    whole, grown = _files(tmp_path / "whole"), _files(tmp_path / "grown")
    assert whole == grown and "metrics.json" in whole
    assert json.loads(whole["metrics.json"])["step"] == 3


def test_logs_deleted_meanwhile_are_written_whole_again(tmp_path):
    """The run's writer extends the logs it wrote; logs another process deleted or changed
    meanwhile are rewritten from the whole history."""
    out, live = tmp_path / "out", tmp_path / "live"
    for e in (1, 2, 3):
        write_sample(out, e, torch.full((3, 10, 8), 40 * e, dtype=torch.uint8))
    speeds = {1: 5.0, 2: 6.0, 3: 7.0}
    log = RunLog(out, live, speeds, torch.empty(0), torch.empty(0))
    log._write_logs(_history(1), speeds)
    log._write_logs(_history(2), speeds)
    (live / "metrics.json").unlink()
    log._write_logs(_history(3), speeds)
    write_live(tmp_path / "whole", _history(3), speeds, out)
    assert _files(live) == _files(tmp_path / "whole")
    assert Image.open(live / "plots" / "images" / "samples" / "epoch_001.png").size == (8, 10)


END_PROCESS = r"""
import atexit, sys, threading, time
from pathlib import Path
from unpaired.errors import end_process, main_guard

marker = Path(sys.argv[2])

class Teardown:  # finalised when the interpreter tears its modules down
    def __del__(self, open=open, marker=marker):  # (the builtins may be gone by then)
        with open(marker, "a") as f:
            f.write("teardown;")

kept = Teardown()

def main():
    print("last line")  # block-buffered: stdout is a pipe
    atexit.register(lambda: open(marker, "a").write("atexit;"))
    if sys.argv[1] == "thread":  # a thread Python would wait for: exits as usual, after it
        threading.Thread(target=lambda: (time.sleep(0.5), open(marker, "a").write("thread;"))).start()

main_guard(main)
end_process()
"""


@pytest.mark.parametrize("case", ["done", "thread"])
def test_end_process_skips_the_teardown_only_when_nothing_is_left_to_finish(case, tmp_path):
    """The train and evaluate stages end with errors.end_process (torch's teardown costs about a
    second): its output is all there, flushed; its exit handlers run; the modules' teardown is
    skipped; but a thread Python would wait for still finishes (the interpreter exits as usual)."""
    marker = tmp_path / "marker"
    got = subprocess.run(
        [sys.executable, "-c", END_PROCESS, case, str(marker)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (got.returncode, got.stdout, got.stderr) == (0, "last line\n", "")
    if case == "done":
        assert marker.read_text() == "atexit;"  # the teardown (the finaliser) never ran
    else:
        assert marker.read_text() == "thread;atexit;teardown;"
