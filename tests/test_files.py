"""unpaired/files.py: modes of atomic outputs, temporaries a killed writer leaves, a full disk, a
damaged packed tar, and the prepared view after the tar changed under it."""

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, env
from tests.test_sources_files import Server
from unpaired import checkpoint
from unpaired.errors import UserError
from unpaired.files import (
    VIEW_MARK,
    atomic_dir,
    atomic_write_bytes,
    pack_dir,
    refresh_view_for,
    remove_stale_temporaries,
    unpack_view,
)
from unpaired.sources.download import download


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_view(root: Path, n: int = 6, seed: int = 0) -> Path:
    """A folder laid out as data/prepared/: split folders of small PNGs and a manifest."""
    rng = np.random.default_rng(seed)
    for split in ("trainA", "trainB", "testA", "testB"):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / split / f"{i}.png"
            )
    (root / "manifest.csv").write_text("file,domain\n")
    return root


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != VIEW_MARK
    }


# --- 7: modes ----------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_outputs_get_the_modes_open_and_mkdir_give(tmp_path, umask):
    """mkstemp/mkdtemp make 0600/0700: checkpoints, ONNX files, manifests, data/raw/<domain>,
    models/best, the packed tar and the download cache were unreadable to a colleague."""
    with open(tmp_path / "plain", "wb"):
        pass
    (tmp_path / "plain_dir").mkdir()
    file_mode, dir_mode = mode(tmp_path / "plain"), mode(tmp_path / "plain_dir")
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)

    atomic_write_bytes(tmp_path / "m.json", b"{}")
    checkpoint.save({"w": torch.zeros(2)}, tmp_path / "ckpt" / "last.pt")
    with atomic_dir(tmp_path / "best") as tmp:
        (tmp / "generators.pt").write_bytes(b"x")
    view = make_view(tmp_path / "prepared", n=1)
    pack_dir(view, tmp_path / "prepared.tar")
    unpack_view(tmp_path / "prepared.tar", tmp_path / "view")
    server = Server()
    try:
        server.routes["/net.pkl"] = (200, b"\x80\x04N.", "")
        download(f"{server.url}/net.pkl", tmp_path / "cache" / "net.pkl", key="k")
    finally:
        server.close()
    for f in (
        "m.json",
        "ckpt/last.pt",
        "best/generators.pt",
        "prepared.tar",
        "prepared/.packed-from",
        "view/trainA/0.png",
        "cache/net.pkl",
    ):
        assert mode(tmp_path / f) == file_mode, f
    for d in ("best", "view", "view/trainA"):
        assert mode(tmp_path / d) == dir_mode, d


def test_fetched_domain_folder_gets_the_mkdir_mode(tmp_path, umask):
    from tests.test_sources_files import run_fetch

    src = tmp_path / "mine"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "x.png")
    out = run_fetch(tmp_path, f"    source: folder\n    path: {src}\n")
    assert mode(out) == 0o777 & ~umask and mode(out / "manifest.csv") == 0o666 & ~umask


# --- 21: temporaries a killed writer leaves ------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    """A real kill -9 between the temporary's creation and its rename: the temporary stays (what DVC
    would commit into models/checkpoints), and remove_stale_temporaries removes it."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"previous")
    code = (
        "import os, signal, sys\nfrom pathlib import Path\nimport unpaired.files as files\n"
        "real = files.os.replace\n"
        "def killed(*a):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "files.os.replace = killed\n"
        f"files.atomic_write_bytes(Path({str(folder / 'last.pt')!r}), b'new' * 1000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in folder.iterdir() if p.name != "last.pt"]
    assert len(left) == 1 and left[0].startswith(".last.pt.tmp-")
    assert remove_stale_temporaries(folder) == [folder / left[0]]
    assert [p.name for p in folder.iterdir()] == ["last.pt"] and (
        folder / "last.pt"
    ).read_bytes() == b"previous"


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    names = {
        f".last.pt.tmp-{dead}-k2j3": True,
        f".last.pt.tmp-{alive}-x9y8": False,  # a running writer's
        ".epoch_001.pt.tmp-a8b7c6d5": True,  # named before the pid was in it
        ".3f2a.png.tmp": True,
        f".net.pkl.part-{dead}-q1": True,
        "last.pt": False,
        ".gitignore": False,
        "notes.tmp": False,
        ".tmpfile": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".prepared.old-{dead}").mkdir()
    (tmp_path / f".prepared.old-{dead}" / "a.png").write_bytes(b"x")
    (tmp_path / f".raw.tmp-{dead}-abc").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".x.tmp-{dead}-1").write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [n for n, gone in names.items() if gone] + [f".prepared.old-{dead}", f".raw.tmp-{dead}-abc"]
    )
    assert (tmp_path / "sub" / f".x.tmp-{dead}-1").exists()  # not recursive unless asked
    remove_stale_temporaries(tmp_path, recursive=True)
    assert not (tmp_path / "sub" / f".x.tmp-{dead}-1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, gone in names.items() if not gone] + ["sub"]
    )


def test_a_stage_removes_stale_temporaries_from_its_output_folders(tmp_path):
    """python -m stages.prepare, in a folder of its own: what a killed prepare left in data/ and
    metrics/ is gone after the next run (dvc would have committed nothing of it)."""
    make_view(tmp_path / "data" / "raw" / "a", n=3)
    make_view(tmp_path / "data" / "raw" / "b", n=3, seed=1)
    (tmp_path / "params.yaml").write_text("prepare:\n  min_size: 8\n")
    dead = dead_pid()
    (tmp_path / "metrics").mkdir()
    leftovers = [
        tmp_path / "data" / f".prepared.tar.tmp-{dead}-zz",
        tmp_path / "metrics" / f".prepare.json.tmp-{dead}-q",
        tmp_path / "data" / f".prepared.tmp-{dead}-d",
        tmp_path / "metrics" / f".data.tmp-{dead}-p",
    ]
    for f in leftovers[:2]:
        f.write_bytes(b"partial")
    for f in leftovers[2:]:
        f.mkdir()
    e = env()
    e["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.prepare",
            "--raw",
            "data/raw/a",
            "data/raw/b",
            "--out",
            "data/prepared.tar",
            "--view",
            "data/prepared",
            "--metrics",
            "metrics/prepare.json",
            "--page",
            "metrics/data",
        ],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert not any(f.exists() for f in leftovers)
    assert (tmp_path / "data" / "prepared.tar").is_file() and (
        tmp_path / "metrics" / "data" / "index.html"
    ).is_file()


# --- 22: a full disk -------------------------------------------------------------------------------------


def in_small_tmpfs(tmp_path: Path, script: str, size: str = "256k") -> subprocess.CompletedProcess:
    """Run `script` (python) with a real, small tmpfs at `tmp_path/full`, mounted in a user and mount
    namespace of its own (unshare), so the disk really fills up (ENOSPC) and nothing is mounted here."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("unshare (user and mount namespaces) is not available for a real small tmpfs")
    (tmp_path / "script.py").write_text(script)
    e = env()
    e["PYTHONPATH"] = str(ROOT)
    e["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size={size} tmpfs "$1" && exec "$2" "$3"',
            "sh",
            str(mnt),
            sys.executable,
            str(tmp_path / "script.py"),
        ],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("writer", ["checkpoint", "packed_tar", "prepare"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_space(tmp_path, writer):
    make_view(tmp_path / "view", n=40)  # about 1 MB of PNGs: more than the 256 KB disk
    raw = tmp_path / "raw"
    make_view(raw / "a", n=40)
    make_view(raw / "b", n=40, seed=1)
    full = tmp_path / "full"
    target = {
        "checkpoint": full / "models" / "last.pt",
        "packed_tar": full / "prepared.tar",
        "prepare": full / "prepared",
    }[writer]
    call = {
        "checkpoint": "import torch; from unpaired import checkpoint; "
        "checkpoint.save({'w': torch.zeros(300_000)}, target)",
        "packed_tar": f"from unpaired.files import pack_dir; pack_dir(Path({str(tmp_path / 'view')!r}), target)",
        "prepare": "from stages.prepare import prepare; from unpaired.prepare import PrepareParams; "
        f"prepare(PrepareParams(min_size=8), Path({str(raw)!r}), target, Path({str(full / 'p.json')!r}), "
        "workers=2)",
    }[writer]
    script = f"""
import os, sys
from pathlib import Path
from unpaired.errors import main_guard
full, target = Path({str(full)!r}), Path({str(target)!r})
target.parent.mkdir(parents=True, exist_ok=True)
(target.parent / "previous").write_bytes(b"previous")
def run():
    {call}
try:
    main_guard(run)
finally:
    left = sorted(str(p.relative_to(full)) for p in full.rglob("*"))
    print("LEFT", left, "PREVIOUS", (target.parent / "previous").read_bytes(), file=sys.stdout)
"""
    proc = in_small_tmpfs(tmp_path, script)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len([line for line in lines if "error:" in line]) == 1 and "Traceback" not in proc.stderr
    line = next(line for line in lines if line.startswith("error: "))
    assert (
        line.startswith(f"error: {target}")
        and "no space left on the device (" in line
        and " free in " in line
    )
    if writer != "prepare":
        assert " needed, " in line  # the size is known before writing
    left = proc.stdout.split("LEFT ")[1]
    assert ".tmp" not in left and ".part" not in left and "b'previous'" in left


# --- 20: a damaged packed tar ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["middle", "header"])
def test_a_damaged_packed_tar_is_refused_and_the_view_kept(tmp_path, where):
    """2 KB overwritten inside data/prepared.tar: in a file's data (found by SHA256SUMS), or over a
    member's header (tarfile would stop there and unpack a partial view, then mark it valid)."""
    good = make_view(tmp_path / "good")
    pack_dir(good, tmp_path / "prepared.tar")
    unpack_view(tmp_path / "prepared.tar", tmp_path / "view")
    before = tree(tmp_path / "view")
    other = make_view(tmp_path / "other", seed=5)
    pack_dir(other, tmp_path / "prepared.tar")
    data = bytearray((tmp_path / "prepared.tar").read_bytes())
    with tarfile.open(tmp_path / "prepared.tar") as t:
        members = t.getmembers()
    if where == "middle":
        start = len(data) // 2
    else:
        start = members[len(members) // 2].offset  # the header of a member half-way
    data[start : start + 2048] = (
        np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    )
    (tmp_path / "prepared.tar").write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        unpack_view(tmp_path / "prepared.tar", tmp_path / "view")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'prepared.tar'}: damaged") and "\n" not in message
    assert "dvc checkout" in message
    assert tree(tmp_path / "view") == before  # the previous view, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- 16: the view after the tar changed under it --------------------------------------------------------


def test_a_stale_view_is_refreshed_for_a_reader(tmp_path, capsys):
    pack_dir(make_view(tmp_path / "new", seed=1), tmp_path / "new.tar")
    old = make_view(tmp_path / "data" / "prepared", seed=0)
    pack_dir(old, tmp_path / "data" / "prepared.tar")
    shutil.copy(
        tmp_path / "new.tar", tmp_path / "data" / "prepared.tar"
    )  # what `dvc checkout` does
    view, tar = tmp_path / "data" / "prepared", tmp_path / "data" / "prepared.tar"
    assert (
        refresh_view_for([tmp_path / "elsewhere"], tar, view) is False
    )  # not a reader of the view
    assert refresh_view_for([view / "testA"], tar, view) is True
    assert tree(view) == tree(tmp_path / "new")
    assert "is not the view of" in capsys.readouterr().err
    assert refresh_view_for([f"{view}/testA/*.png"], tar, view) is False  # up to date now


def test_translate_of_the_prepared_view_reads_the_current_data(tmp_path, monkeypatch, capsys):
    """`unpaired translate data/prepared/testA` after `git checkout <older>` + `dvc checkout`."""
    from unpaired.cli import main
    from unpaired.models.networks import ResnetGenerator, init_weights

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    nets = [init_weights(ResnetGenerator(ngf=4, n_blocks=1)) for _ in range(2)]
    checkpoint.save(
        checkpoint.generators_payload(1, {"ngf": 4, "n_blocks": 1}, *nets), tmp_path / "g.pt"
    )
    pack_dir(make_view(tmp_path / "older", n=2, seed=1), tmp_path / "older.tar")
    pack_dir(
        make_view(Path("data/prepared"), n=5), Path("data/prepared.tar")
    )  # the newer run's view
    shutil.copy(tmp_path / "older.tar", "data/prepared.tar")  # dvc checkout of the older one
    main(["translate", "g.pt", "data/prepared/testA", "--out", "out"])
    assert sorted(p.name for p in Path("out").iterdir()) == [
        "0.png",
        "1.png",
    ]  # the older run's two images
    assert "is not the view of data/prepared.tar" in capsys.readouterr().err


def test_a_full_disk_outside_the_atomic_writers_is_one_line_too(tmp_path):
    """A library writing straight into a full disk (dvclive's logs, say): main_guard's line."""
    script = f"""
from unpaired.errors import main_guard
def run():
    with open({str(tmp_path / "full" / "log.tsv")!r}, "wb") as f:
        f.write(b"x" * 1_000_000)
main_guard(run)
"""
    proc = in_small_tmpfs(tmp_path, script)
    assert (
        proc.returncode == 2
        and "Traceback" not in proc.stderr
        and len(proc.stderr.splitlines()) == 1
    )
    # Python's buffered writer does not say which file failed on flush; the line gives the space left
    assert proc.stderr.startswith("error: a write failed: no space left on the device (")
    assert " free in " in proc.stderr


# --- issue 24.7: a long file name never breaks a write ----------------------------------------------

LONG_NAMES = {
    "ascii": "x" * 240 + ".png",  # 244 bytes: ext4 takes up to 255
    "utf-8": "é" * 120 + ".png",  # 244 bytes in 124 characters
    "max": "y" * 251 + ".png",
}  # 255 bytes: the longest name there is


@pytest.mark.parametrize("name", LONG_NAMES, ids=list(LONG_NAMES))
def test_a_name_the_filesystem_accepts_can_be_written_atomically(tmp_path, name):
    """The temporary `.<name>.tmp-<pid>-<random>` of a 244-byte name was 266 bytes: the write failed
    with "File name too long" (one UserError blaming the folder) although the name itself fits.
    Every atomic writer (file, tree, the tree it replaces) takes any name the filesystem takes."""
    name = LONG_NAMES[name]
    target = tmp_path / name
    target.write_bytes(b"fits")  # the filesystem takes this name
    target.unlink()
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")  # replaces it
    assert target.read_bytes() == b"second"
    folder = tmp_path / "trees" / name
    for content in (b"one", b"two"):  # the second replaces the tree (its `.old-` name)
        with atomic_dir(folder) as tmp:
            (tmp / "f").write_bytes(content)
    assert (folder / "f").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([name, "trees", name, "f"])
    # two long names with the same start never share a temporary, and each matches TEMPORARY
    from unpaired.files import TEMPORARY, temp_name

    a, b = tmp_path / ("z" * 250 + "a"), tmp_path / ("z" * 250 + "b")
    assert temp_name(a, "tmp") != temp_name(b, "tmp")
    for path in (a, b, target):
        assert TEMPORARY.fullmatch(temp_name(path, "tmp") + "abcdefgh")
        assert len(os.fsencode(temp_name(path, "tmp") + "abcdefgh")) <= 255


# --- issue 24.4: a view edited by hand is not the data version ------------------------------------------


@pytest.mark.parametrize("edit", ["delete", "add", "same_size", "truncate"])
def test_a_hand_edit_of_the_view_is_found_and_unpacked_again(tmp_path, monkeypatch, capsys, edit):
    """One image deleted from data/prepared/trainA: train (unpack_view) trained on the edited view
    while dvc.lock recorded the unchanged tar, and `unpaired unpack` said "already matches". The
    view is checked against the tar's index (names, sizes) and the mark's time, and unpacked again
    with a line saying where data is changed instead."""
    from unpaired.cli import main

    monkeypatch.chdir(tmp_path)
    view, tar = Path("data/prepared"), Path("data/prepared.tar")
    pack_dir(make_view(view), tar)
    original = tree(view)
    assert unpack_view(tar, view) is False  # untouched: nothing to do, no line
    assert capsys.readouterr().err == ""
    image = view / "trainA" / "3.png"
    if edit == "delete":
        image.unlink()
    elif edit == "add":
        shutil.copy(image, view / "trainA" / "mine.png")
    elif edit == "same_size":  # other pixels, the same byte count
        data = bytearray(image.read_bytes())
        data[-20] ^= 0xFF
        image.write_bytes(bytes(data))
    else:
        image.write_bytes(image.read_bytes()[:100])
    main(["unpack"])
    out, err = capsys.readouterr()
    assert out == f"{view}/: unpacked from {tar}\n"  # was: "already matches"
    assert err.startswith(f"note: {view}/ differs from {tar} (trainA/") and err.count("\n") == 1
    assert "re-run prepare" in err and "data/raw" in err
    assert tree(view) == original
    main(["unpack"])
    assert capsys.readouterr() == (f"{view}/: already matches {tar}\n", "")
