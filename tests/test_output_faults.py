"""Issue 17.7 and 17.9: an output folder that cannot be created (a read-only filesystem, a file in
the way) is one line naming the path, from the CLI and from a stage; a symlink loop among the
translate inputs is skipped and named like any other unusable input.

The read-only filesystem is a real one: a read-only tmpfs mounted in a user + mount namespace
(`unshare -rm`), with the product run inside it as a subprocess (running as root, chmod would not
stop a write)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TRAIN_STAGE
from unpaired.errors import UserError
from unpaired.files import make_dirs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def noise(path: Path, h: int = 24, w: int = 24, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        path
    )
    return path


def generators(folder: Path) -> Path:
    import torch

    from unpaired import checkpoint
    from unpaired.models.networks import ResnetGenerator, init_weights

    torch.manual_seed(0)
    nets = [init_weights(ResnetGenerator(ngf=4, n_blocks=1)) for _ in range(2)]
    path = folder / "epoch_001.pt"
    checkpoint.save(checkpoint.generators_payload(1, {"ngf": 4, "n_blocks": 1}, *nets), path)
    return path


def namespaces_work() -> str:
    """'' when `unshare -rm` can mount a read-only tmpfs here, else why not."""
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    return (
        ""
        if probe.returncode == 0
        else f"user+mount namespaces unavailable: {probe.stderr.strip()}"
    )


def run_read_only(ro: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`argv` in a user + mount namespace where `ro` is a fresh read-only tmpfs."""
    ro.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(ro), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


NO_NAMESPACES = namespaces_work()
needs_namespaces = pytest.mark.skipif(
    bool(NO_NAMESPACES), reason=NO_NAMESPACES or "namespaces work"
)


@needs_namespaces
def test_translate_out_on_a_read_only_filesystem_is_one_line(tmp_path):
    ckpt = generators(tmp_path)
    noise(tmp_path / "in" / "x.png")
    ro = tmp_path / "ro"
    cli = [sys.executable, "-c", "import sys\nfrom unpaired.cli import main\nmain(sys.argv[1:])"]
    proc = run_read_only(
        ro,
        [*cli, "translate", str(ckpt), str(tmp_path / "in"), "--out", str(ro / "new" / "sub")],
        ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"error: {ro / 'new' / 'sub'}: cannot write here ({ro / 'new'}: Read-only file "
        f"system); choose another place or make it writable\n"
    )
    # an existing folder on it: the file that cannot be written is named
    proc = run_read_only(
        ro, [*cli, "translate", str(ckpt), str(tmp_path / "in"), "--out", str(ro)], ROOT
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        f"error: {ro / 'x.png'}: cannot write here (Read-only file system)"
    )
    assert proc.stderr.count("\n") == 1
    # export writes one file: the same
    proc = run_read_only(ro, [*cli, "export", str(ckpt), "--out", str(ro / "m" / "g.onnx")], ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        f"error: {ro / 'm'}: cannot write here (Read-only file system)"
    ), proc.stderr
    assert proc.stderr.count("\n") == 1


@needs_namespaces
def test_a_stage_output_on_a_read_only_filesystem_is_one_line(tmp_path):
    for d in ("a", "b"):
        for i in range(3):
            noise(tmp_path / "raw" / d / f"{i}.png", seed=i + 10 * (d == "b"))
    (tmp_path / "params.yaml").write_text("prepare:\n  image_size: 16\n  min_size: 8\n")
    ro = tmp_path / "ro"
    proc = run_read_only(
        ro,
        [
            sys.executable,
            "-m",
            "stages.prepare",
            "--raw",
            "raw/a",
            "raw/b",
            "--out",
            "ro/data/prepared.tar",
            "--view",
            "ro/data/prepared",
            "--metrics",
            "ro/metrics/prepare.json",
        ],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: ro/data: cannot write here (Read-only file system); choose "
        "another place or make it writable\n"
    )


def test_a_file_in_the_way_of_an_output_folder_is_one_line(tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(
        UserError, match=rf"^{tmp_path / 'f' / 'sub'}: cannot write here \(.*Not a directory\); "
    ):
        make_dirs(tmp_path / "f" / "sub")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'f'}: cannot write here \(.*\); "):
        make_dirs(tmp_path / "f")
    assert (
        make_dirs(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
        and (tmp_path / "new" / "deep").is_dir()
    )


def test_symlink_loops_among_translate_inputs_are_skipped_and_named(tmp_path):
    ckpt = generators(tmp_path)
    inputs = tmp_path / "in"
    noise(inputs / "good.png")
    (inputs / "self.png").symlink_to("self.png")  # a loop of one
    (inputs / "a.jpg").symlink_to("b.jpg")  # a loop of two
    (inputs / "b.jpg").symlink_to("a.jpg")
    (inputs / "gone.png").symlink_to("missing.png")  # a target that does not exist
    (inputs / "notes.txt").symlink_to("notes.txt")  # not an image name: ignored, as files are
    (tmp_path / "top.png").symlink_to("top.png")  # a loop given by name
    cli = [sys.executable, "-c", "import sys\nfrom unpaired.cli import main\nmain(sys.argv[1:])"]
    proc = subprocess.run(
        [
            *cli,
            "translate",
            str(ckpt),
            str(inputs),
            str(tmp_path / "top.png"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index("skipped 5 file(s):")
    assert sorted(lines[start + 1 : start + 6]) == sorted(
        f"  {p}"
        for p in [
            f"{inputs / 'a.jpg'} (symlink_loop)",
            f"{inputs / 'b.jpg'} (symlink_loop)",
            f"{inputs / 'gone.png'} (broken_link)",
            f"{inputs / 'self.png'} (symlink_loop)",
            f"{tmp_path / 'top.png'} (symlink_loop)",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]
    # only loops: one line that names them
    proc = subprocess.run(
        [*cli, "translate", str(ckpt), str(tmp_path / "top.png"), "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"error: no input images found; skipped 1: {tmp_path / 'top.png'} (symlink_loop)\n"
    )


@needs_namespaces
def test_train_with_its_checkpoints_on_a_read_only_filesystem_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n  epochs_decay: 0\n")
    proc = run_read_only(
        tmp_path / "models",
        [sys.executable, *TRAIN_STAGE],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: models/"), proc.stderr
    assert (
        "cannot write here (Read-only file system); choose another place or make it writable\n"
        in proc.stderr
    )
    assert proc.stderr.count("\n") == 1


def test_folder_loops_end_the_walk_and_are_named_and_linked_folders_are_followed(tmp_path):
    """`in/a/up -> ..` and `in/self -> .`: rglob used to drop them without a word, and glob's `**`
    followed them 40 deep (two of them: minutes). Now each is one skipped entry, in both forms."""
    from unpaired.translate import expand_inputs

    inputs = tmp_path / "in"
    for name in ("x.png", "a/y.png"):
        noise(inputs / name)
    noise(tmp_path / "other" / "o.png")
    (inputs / "linked").symlink_to(tmp_path / "other")
    (inputs / "self").symlink_to(".")
    (inputs / "a" / "up").symlink_to("..")
    want = [inputs / "a" / "y.png", inputs / "linked" / "o.png", inputs / "x.png"]
    loops = [f"{inputs / 'a' / 'up'} (symlink_loop)", f"{inputs / 'self'} (symlink_loop)"]
    for given in (str(inputs), f"{inputs}/**/*.png"):
        skipped: list[str] = []
        assert expand_inputs([given], skipped) == want, given
        assert skipped == loops, given
