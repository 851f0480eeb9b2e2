"""The `unpaired` command: translate, export, help; and the one device validator."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from stages.evaluate import EvaluateParams
from unpaired import checkpoint, params
from unpaired.devices import DEVICES, resolve_device
from unpaired.errors import UserError
from unpaired.export import export_onnx
from unpaired.models.networks import ResnetGenerator, init_weights
from unpaired.models.training import TrainParams
from unpaired.sources.stylegan import StyleGANParams
from unpaired.translate import MIN_SIDE, batches, out_names, pad_crop_forward, translate_files

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def save_generators(folder: Path, seed: int = 0, n_blocks: int = 1) -> Path:
    torch.manual_seed(seed)
    nets = [init_weights(ResnetGenerator(ngf=4, n_blocks=n_blocks)) for _ in range(2)]
    path = folder / "epoch_001.pt"
    checkpoint.save(checkpoint.generators_payload(1, {"ngf": 4, "n_blocks": n_blocks}, *nets), path)
    return path


def noise(path: Path, h: int, w: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def unpaired(capsys, *args: str) -> SimpleNamespace:
    """`unpaired ARGS` in this process: returncode, stdout, stderr."""
    from unpaired.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def cli(*args: str, pre: str = "") -> subprocess.CompletedProcess:
    """`unpaired ARGS` in a fresh interpreter (after the Python statements `pre`)."""
    code = f"import sys\n{pre}\nfrom unpaired.cli import main\nmain(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, cwd=ROOT
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- devices: one validator (issue 11, case 3) -------------------------------------------------------


@pytest.mark.parametrize(
    "cls,prefix,extra",
    [
        (TrainParams, "train", {}),
        (EvaluateParams, "evaluate", {}),
        (StyleGANParams, "domains.a", {"network": "n.pkl"}),
    ],
)
@pytest.mark.parametrize("bad", ["gpu", "-1", "cuda:x", "CPU", "cuda:"])
def test_every_device_key_is_validated_with_its_params_key(cls, prefix, extra, bad):
    with pytest.raises(params.ParamsError) as err:
        params.parse(cls, {"device": bad, **extra}, prefix)
    assert str(err.value) == f"params.yaml: {prefix}.device: unknown device {bad!r}; use {DEVICES}"


@pytest.mark.parametrize("good", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_every_device_spelling_in_the_list_is_accepted(good):
    for cls, extra in (
        (TrainParams, {}),
        (EvaluateParams, {}),
        (StyleGANParams, {"network": "n.pkl"}),
    ):
        assert params.parse(cls, {"device": good, **extra}, "k").device == good


@pytest.mark.parametrize("bad", ["-1", "gpu"])
def test_cli_bad_device_is_one_line_naming_the_flag(tmp_path, capsys, bad):
    ckpt = save_generators(tmp_path)
    noise(tmp_path / "in" / "a.png", 8, 8)
    proc = unpaired(
        capsys,
        "translate",
        str(ckpt),
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "o"),
        "--device",
        bad,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: --device: unknown device {bad!r}; use {DEVICES}\n"


def test_unavailable_device_names_the_flag_or_the_key():
    missing = "mps" if not torch.backends.mps.is_available() else None
    missing = missing or ("cuda:99" if torch.cuda.device_count() < 100 else None)
    with pytest.raises(UserError) as err:
        resolve_device(missing, "--device")
    assert str(err.value).startswith(f"--device: {missing!r}") and "params.yaml" not in str(
        err.value
    )
    with pytest.raises(params.ParamsError) as err:
        resolve_device(missing, "evaluate.device")
    assert str(err.value).startswith(f"params.yaml: evaluate.device: {missing!r}")


# --- translate: any size, any amount (issue 11, case 5) -----------------------------------------------


@pytest.mark.parametrize("n_blocks", [1, 6])
def test_min_side_is_the_generators_true_minimum(n_blocks):
    net = ResnetGenerator(ngf=4, n_blocks=n_blocks).eval()
    with torch.no_grad():
        for h, w in (
            (MIN_SIDE, MIN_SIDE),
            (MIN_SIDE, 200),
            (200, MIN_SIDE),
            (MIN_SIDE + 2, MIN_SIDE + 1),
        ):
            assert pad_crop_forward(net, torch.zeros(1, 3, h, w)).shape == (1, 3, h, w)
        for h, w in ((MIN_SIDE - 1, MIN_SIDE - 1), (MIN_SIDE - 1, 200), (200, 3)):
            with pytest.raises((RuntimeError, ValueError)):
                pad_crop_forward(net, torch.zeros(1, 3, h, w))


def test_too_small_images_are_skipped_and_listed(tmp_path):
    ckpt = save_generators(tmp_path)
    inputs = tmp_path / "in"
    noise(inputs / "a_photo.png", 40, 52)
    noise(inputs / "icon.png", 4, 4)
    noise(inputs / "strip.png", 3, 200)
    noise(inputs / "z_photo.jpg", 33, 21)
    done = translate_files(str(ckpt), [str(inputs)], str(tmp_path / "out"), batch_size=2)
    assert done.written == 2
    assert done.skipped == [
        f"{inputs / 'icon.png'} (too_small: 4x4 px; the generator needs >= 5 px per side, or use --size)",
        f"{inputs / 'strip.png'} (too_small: 200x3 px; the generator needs >= 5 px per side, or use --size)",
    ]
    assert sorted(tree(tmp_path / "out")) == ["a_photo.png", "z_photo.png"]
    # --size brings them up to what the network takes
    done = translate_files(str(ckpt), [str(inputs)], str(tmp_path / "sized"), size=MIN_SIDE)
    assert done.written == 4 and done.skipped == []
    assert Image.open(tmp_path / "sized" / "strip.png").size == (333, 5)
    with pytest.raises(
        UserError, match=r"^--size: must be >= 5 \(the generator needs >= 5 px per side\), got 4$"
    ):
        translate_files(str(ckpt), [str(inputs)], str(tmp_path / "o"), size=4)


def test_batches_go_by_pixels_so_large_photos_go_alone():
    def items(shapes):
        return [
            SimpleNamespace(name=str(i), image=torch.zeros(3, h, w, dtype=torch.uint8))
            for i, (h, w) in enumerate(shapes)
        ]

    def sizes(its, batch_size):
        return [len(b) for b in batches(its, batch_size)]

    assert sizes(items([(1500, 2000)] * 2), 8) == [1, 1]  # two 2000×1500 photos: one at a time
    assert sizes(items([(64, 64)] * 19), 8) == [8, 8, 3]  # small ones: --batch-size a pass
    assert sizes(items([(512, 512)] * 5), 8) == [2, 2, 1]  # 8 × 256² pixels a pass
    # all different shapes: images waiting for a batch never hold much more than one pass's pixels
    mixed = items([(300 + i, 400) for i in range(40)])
    read = []

    def source():
        for it in mixed:
            read.append(it)
            yield it

    done, most = 0, 0
    for b in batches(source(), 8):
        most = max(most, sum(it.image[0].numel() for it in read[done:]))
        done += len(b)
    assert done == 40 and most <= 8 * 256 * 256 + 340 * 400


@pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="caps memory with RLIMIT_AS (Linux)"
)
def test_out_of_memory_names_the_file_and_what_to_do(tmp_path):
    """A real allocation failure: the address space of the process is capped just above what the
    loaded program uses, and a 2000×1500 photo needs more than that."""
    ckpt = save_generators(tmp_path)
    photo = noise(tmp_path / "in" / "photo.png", 1500, 2000)
    small = noise(tmp_path / "in" / "a_small.png", 16, 16)
    pre = (
        "import resource, torch, PIL.Image, tqdm, unpaired.checkpoint, unpaired.images\n"
        "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 80 * 2**20, resource.RLIM_INFINITY))"
    )
    proc = cli(
        "translate", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"), pre=pre
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (
        f"error: {photo}: out of memory translating this 2000x1500 image on cpu (1 written "
        f"before it); use --size N (e.g. --size 512) to scale inputs down, or --batch-size 1\n"
    )
    assert sorted(tree(tmp_path / "out")) == [small.name]  # no temporary left behind


# --- translate: outputs that collide or destroy (issue 11, case 6) -------------------------------------


def test_outputs_never_collide(tmp_path):
    ckpt = save_generators(tmp_path)
    inputs = tmp_path / "in"
    for i, name in enumerate(("x.jpg", "x.png", "x_1.png")):
        noise(inputs / name, 12, 16, seed=i)
    done = translate_files(str(ckpt), [str(inputs)], str(tmp_path / "out"))
    assert done.written == 3 and sorted(tree(tmp_path / "out")) == ["x.jpg.png", "x.png", "x_1.png"]
    assert done.renamed == [f"{inputs / 'x.jpg'} -> x.jpg.png"]
    # unique by construction, whatever the names (compared ignoring case, as macOS and Windows do)
    for files in (
        ["a/x.png", "b/x.png", "c/x.png", "x_2.png"],
        ["x.jpg", "x.jpg.png", "X.PNG", "x.Png"],
        ["x.jpg", "x.jpeg", "x.webp", "x_2.png", "x.jpg.png", "sub/x.jpg"],
        ["x", "x.png", "x.jpg"],
    ):
        names = out_names([Path(f) for f in files])
        assert len({n.casefold() for n in names}) == len(files), (files, names)
    assert out_names([Path("a/x.png"), Path("b/x.png"), Path("x_2.png")]) == [
        "x.png",
        "x_3.png",
        "x_2.png",
    ]


@pytest.mark.parametrize("where", ["same", "inside", "contains", "file_inside"])
def test_out_overlapping_the_inputs_is_refused(tmp_path, capsys, where):
    ckpt = save_generators(tmp_path)
    inputs = tmp_path / "photos" / "in"
    noise(inputs / "x.png", 12, 12)
    before = tree(tmp_path / "photos")
    out, given = {
        "same": (inputs, inputs),
        "inside": (inputs / "out", inputs),
        "contains": (tmp_path / "photos", inputs),
        "file_inside": (inputs, inputs / "x.png"),
    }[where]
    proc = unpaired(capsys, "translate", str(ckpt), str(given), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert (
        proc.stderr.startswith(f"error: --out: {out} ")
        and "choose a folder outside the inputs" in proc.stderr
    )
    assert tree(tmp_path / "photos") == before


def test_no_readable_input_creates_no_out_folder(tmp_path, capsys):
    ckpt = save_generators(tmp_path)
    (tmp_path / "bad.png").write_text("nope")
    noise(tmp_path / "tiny.png", 3, 3)
    proc = unpaired(
        capsys,
        "translate",
        str(ckpt),
        str(tmp_path / "bad.png"),
        str(tmp_path / "tiny.png"),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert "bad.png (not_image)" in proc.stdout and "tiny.png (too_small: 3x3 px" in proc.stdout
    assert proc.stderr == "error: no image could be translated; nothing written\n"
    assert not (tmp_path / "o").exists()


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path):
    ckpt = save_generators(tmp_path)
    noise(tmp_path / "in" / "x.png", 12, 12)
    (tmp_path / "out" / "x.png").mkdir(parents=True)  # an output name taken by a folder
    (tmp_path / "out" / ".x.png.tmp").write_bytes(b"left by a killed run")
    done = translate_files(str(ckpt), [str(tmp_path / "in")], str(tmp_path / "out"))
    assert done.written == 0
    assert done.skipped == [
        f"{tmp_path / 'in' / 'x.png'} (not written: {tmp_path / 'out' / 'x.png'}: Is a directory)"
    ]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]


def test_one_bad_item_of_a_batch_is_skipped_and_named_and_the_rest_written(tmp_path, capsys):
    """Issue 24.13: in one batch of same-size images, an undecodable file, an output name the
    filesystem refuses (over 255 bytes: the .jpg of a colliding pair keeps its extension) and an
    output name taken by a folder: each is skipped and named, every other image is written, no
    temporary is left, and the rename list names only what was written."""
    ckpt = save_generators(tmp_path)
    inputs = tmp_path / "in"
    long = "x" * 251
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png", "e.jpg", "e.png", f"{long}.jpg"]):
        noise(inputs / name, 12, 16, seed=i)
    (inputs / f"{long}.png").write_bytes(
        b"\x89PNG\r\n\x1a\n not really"
    )  # undecodable: its .jpg is renamed
    out = tmp_path / "out"
    (out / "c.png").mkdir(parents=True)  # an output name taken by a folder
    proc = unpaired(
        capsys, "translate", str(ckpt), str(inputs), "--out", str(out), "--batch-size", "16"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"translated 5 image(s) AtoB -> {out}",
        "1 output(s) renamed where input names collide:",
        f"  {inputs / 'e.jpg'} -> e.jpg.png",
        "skipped 3 file(s):",
        f"  {inputs / (long + '.png')} (not_image)",
        f"  {inputs / 'c.png'} (not written: {out / 'c.png'}: Is a directory)",
        f"  {inputs / (long + '.jpg')} (not written: {out / (long + '.jpg.png')}: File name too long)",
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
        "e.jpg.png",
        "e.png",
    ]
    assert all(
        Image.open(out / n).size == (16, 12)
        for n in ["a.png", "b.png", "d.png", "e.png", "e.jpg.png"]
    )


def test_the_rename_list_never_names_a_skipped_file(tmp_path, capsys):
    """Issue 24.13: `truncated.png` and a truncated `truncated.jpg`: the .jpg is skipped, so nothing
    was renamed (the list named `truncated.jpg -> truncated.jpg.png`, a file never written)."""
    ckpt = save_generators(tmp_path)
    noise(tmp_path / "in" / "truncated.png", 12, 12)
    jpg = noise(tmp_path / "in" / "truncated.jpg", 64, 64, seed=1).with_suffix(".jpg")
    Image.open(tmp_path / "in" / "truncated.jpg").save(jpg, "JPEG")
    jpg.write_bytes(jpg.read_bytes()[:300])
    proc = unpaired(
        capsys, "translate", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out")
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"translated 1 image(s) AtoB -> {tmp_path / 'out'}",
        "skipped 1 file(s):",
        f"  {jpg} (truncated)",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["truncated.png"]


def test_export_into_an_existing_folder_and_without_torch_notes(tmp_path):
    """In a fresh interpreter, as users run it (pytest would catch the warnings otherwise)."""
    ckpt = save_generators(tmp_path)
    (tmp_path / "models").mkdir()
    proc = cli("export", str(ckpt), "--direction", "BtoA", "--out", str(tmp_path / "models"))
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout == f"exported BtoA generator -> {tmp_path / 'models' / 'epoch_001_BtoA.onnx'}\n"
    )
    assert proc.stderr == ""  # none of torch's exporter notes
    assert (tmp_path / "models" / "epoch_001_BtoA.onnx").stat().st_size > 1000
    assert (
        export_onnx(str(ckpt), f"{tmp_path / 'new'}/") == tmp_path / "new" / "epoch_001_AtoB.onnx"
    )
    assert (tmp_path / "new" / "epoch_001_AtoB.onnx").is_file()


def test_onnx_any_size_matches_translate(tmp_path):
    import onnxruntime as ort

    ckpt = save_generators(tmp_path)
    path = export_onnx(str(ckpt), str(tmp_path / "g.onnx"), "AtoB")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net, _ = checkpoint.load_generator(ckpt, "AtoB")
    for shape in ((1, 3, 30, 42), (2, 3, 24, 44), (1, 3, 5, 9), (1, 3, 64, 64)):
        x = torch.rand(shape) * 2 - 1
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want = pad_crop_forward(net, x).numpy()
        assert got.shape == shape and np.abs(got - want).max() <= 1e-4
    # and the same pixels as `unpaired translate` on a 42×30 image
    noise(tmp_path / "in" / "p.png", 30, 42)
    translate_files(str(ckpt), [str(tmp_path / "in")], str(tmp_path / "out"))
    pixels = np.asarray(Image.open(tmp_path / "in" / "p.png"), dtype=np.float32).transpose(2, 0, 1)[
        None
    ]
    got = session.run(None, {"image": pixels / 127.5 - 1})[0][0].transpose(1, 2, 0)
    got = np.clip(np.rint((got + 1) * 127.5), 0, 255)
    want = np.asarray(Image.open(tmp_path / "out" / "p.png"), dtype=np.float32)
    assert got.shape == want.shape == (30, 42, 3) and np.abs(got - want).max() <= 1


# --- translate: inputs of every kind, sizes, the report --------------------------------------------------


def test_translate_mixed_inputs(tmp_path):
    ckpt = save_generators(tmp_path)
    inputs = tmp_path / "in"
    noise(inputs / "odd.png", 37, 51)
    noise(inputs / "sub" / "gray.jpg", 40, 40, mode="L")
    noise(tmp_path / "globbed.webp", 40, 40)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (inputs / "empty.jpg").write_bytes(b"")
    done = translate_files(
        str(ckpt),
        [str(inputs), str(tmp_path / "*.webp")],
        str(tmp_path / "out"),
        "BtoA",
        batch_size=2,
    )
    assert done.written == 3 and len(done.skipped) == 2
    assert sorted(done.skipped) == [
        f"{inputs / 'broken.png'} (not_image)",
        f"{inputs / 'empty.jpg'} (empty)",
    ]
    assert Image.open(tmp_path / "out" / "odd.png").size == (51, 37)  # any size, cropped back
    assert Image.open(tmp_path / "out" / "gray.png").size == (40, 40)


def test_size_and_keep_size(tmp_path, capsys):
    ckpt = save_generators(tmp_path)
    noise(tmp_path / "in" / "odd.png", 37, 51)
    translate_files(str(ckpt), [str(tmp_path / "in")], str(tmp_path / "sized"), size=24)
    assert Image.open(tmp_path / "sized" / "odd.png").size == (33, 24)
    translate_files(
        str(ckpt), [str(tmp_path / "in")], str(tmp_path / "kept"), size=24, keep_size=True
    )
    assert Image.open(tmp_path / "kept" / "odd.png").size == (51, 37)
    proc = unpaired(
        capsys,
        "translate",
        str(ckpt),
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "k2"),
        "--size",
        "24",
        "--keep-size",
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        Image.open(tmp_path / "k2" / "odd.png").tobytes()
        == Image.open(tmp_path / "kept" / "odd.png").tobytes()
    )


def test_translate_cli_lists_skipped_and_a_missing_checkpoint(tmp_path, capsys):
    ckpt = save_generators(tmp_path)
    noise(tmp_path / "ok.png", 8, 8)
    (tmp_path / "bad.png").write_text("nope")
    proc = unpaired(
        capsys,
        "translate",
        str(ckpt),
        str(tmp_path / "ok.png"),
        str(tmp_path / "bad.png"),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == (
        f"translated 1 image(s) AtoB -> {tmp_path / 'o'}\n"
        f"skipped 1 file(s):\n  {tmp_path / 'bad.png'} (not_image)\n"
    )
    proc = unpaired(
        capsys,
        "translate",
        str(tmp_path / "missing.pt"),
        str(tmp_path / "ok.png"),
        "--out",
        str(tmp_path / "o2"),
    )
    assert (
        proc.returncode == 2
        and proc.stderr == f"error: {tmp_path / 'missing.pt'}: checkpoint not found\n"
    )


# --- help (issue 12, item 7) --------------------------------------------------------------------------


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom unpaired.cli import main\n"
        "for argv in (['--help'], ['translate', '--help'], ['export', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("TORCH False"), proc.stdout[-300:]


@pytest.mark.parametrize(
    "command,defaults",
    [
        (
            "translate",
            [
                "which generator (default: AtoB)",
                "(large photos go one at a time) (default: 8)",
                "or mps (default: auto)",
                "default: each image's own size",
                "original size (default: False)",
            ],
        ),
        ("export", ["which generator (default: AtoB)", "file format (default: onnx)"]),
        ("remote-status", ["default: the default remote", "from this clone (default: False)"]),
        ("unpack", []),
    ],
)
def test_every_subcommand_help_has_a_description_and_defaults(command, defaults, capsys):
    from unpaired.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith(f"usage: unpaired {command}") and len(description) > 40
    for d in defaults:
        assert d in " ".join(text.split()), (command, d)


def test_a_folder_as_checkpoint_and_keep_size_without_size_are_one_line(tmp_path, capsys):
    ckpt = save_generators(tmp_path / "best")
    noise(tmp_path / "in" / "x.png", 24, 24)
    folder = unpaired(
        capsys, "translate", str(ckpt.parent), str(tmp_path / "in"), "--out", str(tmp_path / "o")
    )
    assert folder.returncode == 2 and folder.stderr == (
        f"error: {ckpt.parent}: a folder, not a checkpoint file; pass a file in it, e.g. "
        f"models/best/generators.pt or models/checkpoints/epoch_NNN.pt\n"
    )
    keep = unpaired(
        capsys,
        "translate",
        str(ckpt),
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "o"),
        "--keep-size",
    )
    assert keep.returncode == 2 and keep.stderr.startswith("error: --keep-size: only with --size N")
    assert not (tmp_path / "o").exists()
