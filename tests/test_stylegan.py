"""StyleGAN2 generator, safe loading of network pickles, and the `stylegan` source.

The pickles here are built the way the official stylegan2-ada-pytorch training loop writes them: a
snapshot dict whose networks are pickled by `torch_utils.persistence` as calls
`_reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name, state}. A
stand-in `torch_utils.persistence` module exists only while pickling (pickle stores a function by
name); its function must never be called on load.
"""

import collections
import hashlib
import os
import pickle
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_sources_files import Server, run_fetch
from unpaired.errors import UserError
from unpaired.params import ParamsError
from unpaired.safe_pickle import UnsafePickle, load_generator, save_generator
from unpaired.sources.base import SourceError
from unpaired.sources.stylegan2 import Generator, GeneratorConfig, seed_latents, to_uint8

SMALL = dict(
    z_dim=16,
    w_dim=16,
    img_resolution=16,
    img_channels=3,
    mapping_layers=2,
    channel_base=256,
    channel_max=32,
)


def small_generator(seed=0, **overrides) -> Generator:
    torch.manual_seed(seed)
    g = Generator(GeneratorConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # official init leaves biases 0, strengths 0 and w_avg 0: vary them
        for t in list(g.parameters()) + [g.mapping.w_avg]:
            t.add_(0.1 * torch.randn_like(t))
    return g


class Record:
    """Pickles as the official persistence does: `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, class_name, state, module_src="class Generator: ..."):
        self.meta = dict(
            type="class", version=6, module_src=module_src, class_name=class_name, state=state
        )

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


def record_of(module, init_kwargs=None, extra_state=None, module_src="class Generator: ..."):
    state = dict(
        training=False,
        _parameters=collections.OrderedDict(
            (k, torch.nn.Parameter(v.detach().clone(), requires_grad=False))
            for k, v in module._parameters.items()
        ),
        _buffers=collections.OrderedDict((k, v.clone()) for k, v in module._buffers.items()),
        _non_persistent_buffers_set=set(),
        _modules=collections.OrderedDict((k, record_of(m)) for k, m in module._modules.items()),
        _forward_hooks=collections.OrderedDict(),
    )
    if init_kwargs is not None:
        state.update(_init_args=(), _init_kwargs=init_kwargs)
    state.update(extra_state or {})
    return Record(type(module).__name__, state, module_src)


def official_kwargs(g: Generator) -> dict:
    c = g.cfg
    return dict(
        z_dim=c.z_dim,
        c_dim=0,
        w_dim=c.w_dim,
        img_resolution=c.img_resolution,
        img_channels=c.img_channels,
        mapping_kwargs={"num_layers": c.mapping_layers},
        synthesis_kwargs={
            "channel_base": c.channel_base,
            "channel_max": c.channel_max,
            "num_fp16_res": c.num_fp16_res,
            "conv_clamp": c.conv_clamp,
            "architecture": "skip",
        },
    )


@pytest.fixture
def persistence(monkeypatch):
    calls = []
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        calls.append(meta)
        raise AssertionError("the official loader ran")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    yield calls


def write_snapshot(path, g: Generator, extra_state=None, module_src="class Generator: ..."):
    rec = record_of(g, official_kwargs(g), extra_state, module_src)
    snapshot = dict(
        G=rec,
        D=None,
        G_ema=rec,
        augment_pipe=None,
        training_set_kwargs=dict(path="ffhq.zip", resolution=g.cfg.img_resolution),
    )
    path.write_bytes(pickle.dumps(snapshot, protocol=4))
    return path


def test_seed_latents_are_generate_py_latents():
    z = seed_latents([0, 42], 512)
    assert torch.equal(z[1], torch.from_numpy(np.random.RandomState(42).randn(512)))


def test_official_layout_pickle_loads_to_the_same_network(tmp_path, persistence):
    g = small_generator()
    path = write_snapshot(tmp_path / "net.pkl", g)
    loaded = load_generator(path)
    assert persistence == []
    assert loaded.cfg.img_resolution == 16 and loaded.synthesis.num_ws == 6
    z = seed_latents([0, 1, 7], 16)
    for psi in (1.0, 0.7):
        for mode in ("const", "none"):
            with torch.no_grad():
                assert torch.equal(loaded(z, psi, noise_mode=mode), g(z, psi, noise_mode=mode))


def test_fused_and_batched_forms_agree_and_truncation_works():
    g = small_generator(conv_clamp=256.0)
    z = seed_latents(range(4), 16)
    with torch.no_grad():
        fused, batched = g(z, 0.7, fused=True), g(z, 0.7, fused=False)
        assert (fused - batched).abs().max() < 1e-4
        same = g(z, 0.0)  # psi 0: every image is the one of w_avg
        assert (same - same[:1]).abs().max() < 1e-5
        assert not torch.allclose(g(z, 1.0), g(z, 0.7))
        one_by_one = torch.cat([g(z[i : i + 1], 0.7, fused=False) for i in range(4)])
    assert (one_by_one - batched).abs().max() < 1e-5


def test_fp16_layers_are_fp32_on_cpu(tmp_path, persistence):
    g = small_generator(num_fp16_res=2, conv_clamp=256.0)
    assert [g.synthesis.b8.use_fp16, g.synthesis.b16.use_fp16] == [True, True]
    loaded = load_generator(write_snapshot(tmp_path / "net.pkl", g))
    assert loaded.cfg.num_fp16_res == 2 and loaded.cfg.conv_clamp == 256.0
    with torch.no_grad():
        out = loaded(seed_latents([3], 16), 0.7)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_plain_state_dict_round_trip(tmp_path):
    g = small_generator(1)
    save_generator(g, tmp_path / "g.pt")
    loaded = load_generator(tmp_path / "g.pt")
    z = seed_latents([5], 16)
    with torch.no_grad():
        assert torch.equal(loaded(z, 0.7), g(z, 0.7))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, persistence):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = write_snapshot(
        tmp_path / "evil.pkl",
        small_generator(),
        extra_state={"hook": Evil()},
        module_src=f"open({str(marker)!r}, 'w')\nclass Generator: ...",
    )
    with pytest.raises(UnsafePickle) as err:
        load_generator(path)
    assert str(err.value).startswith(f"{path}: refers to ") and "system" in str(err.value)
    assert "refused (nothing in the file was run)" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists() and persistence == []
    # source embedded in an otherwise clean pickle is kept as text and never executed
    load_generator(
        write_snapshot(
            tmp_path / "src.pkl",
            small_generator(),
            module_src=f"open({str(marker)!r}, 'w')\nclass Generator: ...",
        )
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, words",
    [
        (
            b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x011\x94\x85\x94R\x94.",
            "builtins.eval",
        ),
        (b"not a pickle at all", "not a readable network pickle"),
    ],
)
def test_other_bad_files(tmp_path, payload, words):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(UserError, match=words):
        load_generator(path)


def fetch_body(network, **keys):
    keys = {"seeds": "0-4", "image_size": 8, "batch_size": 2, **keys}
    return f"    source: stylegan\n    network: {network}\n" + "".join(
        f"    {k}: {v!r}\n" if isinstance(v, str) else f"    {k}: {v}\n" for k, v in keys.items()
    )


def images_of(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_stylegan_source_is_reproducible_and_batch_independent(tmp_path, persistence):
    net = write_snapshot(tmp_path / "net.pkl", small_generator())
    out = run_fetch(tmp_path, fetch_body(net))
    first = images_of(out)
    assert list(first) == [f"seed{s:05d}.png" for s in range(5)]
    manifest = pd.read_csv(out / "manifest.csv")
    digest = hashlib.sha256(net.read_bytes()).hexdigest()[:16]
    assert manifest.origin[3] == f"net.pkl@sha256:{digest}#seed=3,psi=0.7,noise=const"
    assert "non-commercial" in manifest.licence[0]
    assert images_of(run_fetch(tmp_path, fetch_body(net, batch_size=5))) == first
    more = images_of(run_fetch(tmp_path, fetch_body(net, seeds="0-6")))
    assert {k: more[k] for k in first} == first and len(more) == 7
    # the same image as the network itself gives for that seed, downscaled
    with torch.no_grad():
        direct = to_uint8(small_generator()(seed_latents([2], 16), 0.7))[0].numpy()
    from PIL import Image

    expected = Image.fromarray(direct).resize((8, 8), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(Image.open(out / "seed00002.png")), np.asarray(expected))
    # random noise: seeded per image, so the batch does not matter either
    r1 = images_of(run_fetch(tmp_path, fetch_body(net, noise_mode="random", batch_size=1)))
    r2 = images_of(run_fetch(tmp_path, fetch_body(net, noise_mode="random", batch_size=4)))
    assert r1 == r2 and r1 != first


def test_network_from_url_is_cached_and_checked(tmp_path, persistence):
    net = write_snapshot(tmp_path / "net.pkl", small_generator())
    server = Server()
    try:
        server.routes["/ffhq.pkl"] = (200, net.read_bytes(), "")
        sha = hashlib.sha256(net.read_bytes()).hexdigest()
        url = f"{server.url}/ffhq.pkl"
        run_fetch(tmp_path, fetch_body(url, sha256=sha))
        run_fetch(tmp_path, fetch_body(url, sha256=sha, seeds="3-5"))
        assert server.hits["/ffhq.pkl"] == 1
        with pytest.raises(SourceError, match=r"^domains.a.network: .*answered HTTP 404"):
            run_fetch(tmp_path, fetch_body(f"{server.url}/nothing.pkl"))
    finally:
        server.close()


def test_stylegan_source_errors(tmp_path, persistence):
    with pytest.raises(
        ParamsError, match=r"domains.a.network: required: .*ffhq.pkl \(non-commercial"
    ):
        run_fetch(tmp_path, "    source: stylegan\n")
    with pytest.raises(SourceError, match=r"^domains.a.network: .*nope.pkl not found; .*ffhq.pkl"):
        run_fetch(tmp_path, fetch_body(tmp_path / "nope.pkl"))
    net = write_snapshot(tmp_path / "net.pkl", small_generator())
    for key, value, words in [
        ("seeds", "5-1", "ends before it starts"),
        ("seeds", "a-b", "expected seeds like"),
        ("noise_mode", "loud", "must be one of 'const', 'random', 'none'"),
        ("truncation_psi", 3, "must be in"),
    ]:
        with pytest.raises(ParamsError, match=rf"domains.a.{key}: .*{words}"):
            run_fetch(tmp_path, fetch_body(net, **{key: value}))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"\x80\x04cposix\nsystem\n(S'true'\ntR.")
    with pytest.raises(SourceError, match=r"^domains.a.network: .*posix.system.*refused"):
        run_fetch(tmp_path, fetch_body(evil))
    assert not (tmp_path / "raw" / "a").exists()


def test_kwargs_as_converted_networks_write_them(tmp_path, persistence):
    """NVIDIA's converted networks spell out every kwarg (legacy.py's convert_tf_generator)."""
    g = small_generator()
    kwargs = official_kwargs(g)
    kwargs["mapping_kwargs"].update(
        embed_features=None,
        layer_features=16,
        activation="lrelu",
        lr_multiplier=0.01,
        w_avg_beta=0.995,
    )
    kwargs["synthesis_kwargs"].update(
        resample_filter=[1, 3, 3, 1], use_noise=True, activation="lrelu"
    )
    rec = record_of(g, kwargs)
    (tmp_path / "conv.pkl").write_bytes(pickle.dumps({"G_ema": rec}, protocol=4))
    with torch.no_grad():
        z = seed_latents([4], 16)
        assert torch.equal(load_generator(tmp_path / "conv.pkl")(z, 0.7), g(z, 0.7))
    kwargs["synthesis_kwargs"]["architecture"] = "resnet"
    (tmp_path / "resnet.pkl").write_bytes(pickle.dumps({"G_ema": record_of(g, kwargs)}, protocol=4))
    with pytest.raises(UserError, match=r"synthesis_kwargs.architecture='resnet' is not supported"):
        load_generator(tmp_path / "resnet.pkl")


def test_a_tensorflow_era_pickle_is_named_with_how_to_convert_it(tmp_path):
    """A pickle of `dnnlib.tflib.network.Network` objects, as NVlabs/stylegan2 wrote them: the tuple
    (G, D, Gs), each built by NEWOBJ + BUILD from its state. Crafted opcode by opcode: no such class
    exists here, and the loader refuses it before any would be called."""
    network = b"cdnnlib.tflib.network\nNetwork\n)\x81}(X\x07\x00\x00\x00versionK\x04ub"
    path = tmp_path / "stylegan2-ffhq-config-f.pkl"
    path.write_bytes(b"\x80\x02" + network * 3 + b"\x87.")
    with pytest.raises(UserError) as err:
        load_generator(path)
    message = str(err.value)
    assert message.startswith(
        f"{path}: a TensorFlow-era StyleGAN2 network (a pickle of dnnlib.tflib.network.Network"
    )
    assert f"python legacy.py --source={path} --dest=converted.pkl" in message
    assert "stylegan2-ada-pytorch" in message and "\n" not in message and "safety" not in message
