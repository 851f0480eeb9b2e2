"""CUT and FastCUT (train.model: cut, fastcut) through the same pipeline as CycleGAN, at tiny sizes:
their params, the train stage (resume included), evaluate, translate and ONNX export of a
one-directional run. Parity with the reference's own code: tests/test_reference_parity.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from stages.evaluate import EvaluateParams, evaluate
from stages.train import train
from tests.test_evaluate import LocalFeatures, make_test_data, paths_in
from tests.test_train import make_prepared, run_files, same, weights
from unpaired import checkpoint
from unpaired import evaluation as evl
from unpaired.errors import UserError
from unpaired.export import export_onnx
from unpaired.models.cut import CUT
from unpaired.models.training import TrainParams
from unpaired.params import ParamsError, parse
from unpaired.translate import pad_crop_forward

# One residual block: layer 16 would be an upsampling ReLU, so the NCE layers stop at 12.
TINY = TrainParams(
    model="cut",
    epochs=1,
    epochs_decay=1,
    ngf=4,
    ndf=4,
    n_blocks=1,
    load_size=28,
    crop_size=24,
    samples=2,
    nce_layers=(0, 4, 8, 12),
    num_patches=16,
    netF_nc=16,
)


def test_auto_keys_resolve_per_model():
    cut, fast = TrainParams(model="cut"), TrainParams(model="fastcut")
    keys = ("lambda_nce", "nce_idt", "flip_equivariance", "antialias")
    assert [cut.resolved(k) for k in keys] == [1.0, True, False, True]
    assert [fast.resolved(k) for k in keys] == [10.0, False, True, True]
    assert TrainParams().resolved("antialias") is False  # CycleGAN's reference has none
    assert (
        parse(TrainParams, {"model": "cut", "lambda_nce": 3}, "train").resolved("lambda_nce") == 3
    )


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": "cut", "pool_size": 10}, "train.pool_size"),
        ({"model": "fastcut", "lambda_cycle": 5}, "train.lambda_cycle"),
        ({"model": "cut", "lambda_identity": 0}, "train.lambda_identity"),
        ({"lambda_nce": 2}, "train.lambda_nce"),
        ({"nce_idt": True}, "train.nce_idt"),
        ({"model": "cut", "nce_layers": [0, 4, 99]}, "train.nce_layers"),
        ({"model": "cut", "nce_layers": [8, 4]}, "train.nce_layers"),
        ({"model": "cut", "lambda_nce": 0}, "train.lambda_nce"),
        ({"model": "cut", "nce_T": 0}, "train.nce_T"),
        ({"model": "gan"}, "train.model"),
    ],
)
def test_the_other_models_keys_and_bad_values_are_refused_in_one_line(raw, key):
    with pytest.raises(ParamsError, match=f"^params.yaml: {key}: ") as err:
        parse(TrainParams, raw, "train")
    assert "\n" not in str(err.value)
    other = ("pool_size", "lambda_cycle", "lambda_identity", "nce_idt")
    if key.split(".")[1] in other or raw == {"lambda_nce": 2}:
        assert f"is not used by train.model {raw.get('model', 'cyclegan')}" in str(err.value)


def test_f_normalises_a_zero_feature_with_finite_gradients():
    """A patch whose features are all zero (after a ReLU; common at small ngf) reaches F's l2
    normalisation as a zero vector: it stays zero and every gradient is finite (the reference's
    pow(0.5) gives NaN there, which made every loss NaN in a tiny sweep)."""
    from unpaired.models.networks import PatchSampleF

    torch.manual_seed(0)
    F_ = PatchSampleF(nc=8)
    F_.create([4])
    feat = torch.zeros(2, 4, 3, 3, requires_grad=True)
    random = torch.randn(2, 4, 3, 3)
    (out,) = F_([feat], [torch.tensor([0, 4])])
    (other,) = F_([random], [torch.tensor([0, 4])])
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in F_.parameters())
    assert torch.isfinite(feat.grad).all()
    want = F_.mlps[0](random.permute(0, 2, 3, 1).flatten(1, 2)[:, [0, 4], :].flatten(0, 1))
    want = want.div(want.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7)  # the reference's formula
    assert torch.allclose(other, want, atol=1e-7)


def test_f_and_its_optimizer_come_after_g_and_d():
    """F's MLPs are sized by G's features (3, 2·ngf, 4·ngf, 4·ngf channels at layers 0, 4, 8, 12)
    and drawn after G and D from torch's stream; its optimizer holds exactly its weights."""
    torch.manual_seed(0)
    m = CUT(TINY, torch.device("cpu"), 1, torch.Generator().manual_seed(0), False)
    assert [mlp[0].in_features for mlp in m.models.F.mlps] == [3, 8, 16, 16]
    assert list(m.optimizers) == ["G", "D", "F"]
    assert {id(w) for w in m.optimizers["F"].param_groups[0]["params"]} == {
        id(w) for w in m.models.F.parameters()
    }
    assert m.positions == [30 * 30, 24 * 24, 12 * 12, 6 * 6]


@pytest.fixture
def data(tmp_path):
    root = make_prepared(tmp_path / "prepared", n=(3, 3), size=28)
    return root


@pytest.mark.parametrize("model", ["cut", "fastcut"])
def test_cut_trains_resumes_and_evaluates_through_the_stages(
    model, tmp_path, data, capsys, monkeypatch
):
    """train.model cut (and fastcut) through the real train stage: an interrupted run resumed
    equals a straight one; the epoch files hold G_AB alone; evaluate scores A→B only and says so;
    translate refuses B→A in one line; the ONNX export translates as the checkpoint does."""
    p = replace(TINY, model=model, epochs=1, epochs_decay=1)
    train(p, data, tmp_path / "straight", tmp_path / "l1")
    train(p, data, tmp_path / "resumed", tmp_path / "l2", stop_after=1)
    train(p, data, tmp_path / "resumed", tmp_path / "l2")
    assert "resuming from" in capsys.readouterr().out
    out = tmp_path / "resumed"
    assert same(weights(tmp_path / "straight" / "last.pt"), weights(out / "last.pt"))
    assert run_files(out) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    last = checkpoint.load(out / "last.pt")
    assert set(last["nets"]) == {"G", "D", "F"} and {"opt_F", "sched_F"} <= set(last)
    assert "G_BA" not in last and "pool_A" not in last
    epoch = checkpoint.load(out / "epoch_002.pt")
    assert set(epoch) == {"format", "epoch", "model", "G_AB"}
    assert epoch["model"]["kind"] == model and epoch["model"]["antialias"] is True
    nce_y = pd.read_csv(tmp_path / "l2" / "plots" / "metrics" / "NCE_Y.tsv", sep="\t")
    # FastCUT has no identity NCE: NCE_Y is logged as 0
    assert list(nce_y.step) == [1, 2] and ((nce_y.NCE_Y > 0) == (model == "cut")).all()
    assert (tmp_path / "l1" / "plots" / "metrics" / "NCE.tsv").read_text() == (
        tmp_path / "l2" / "plots" / "metrics" / "NCE.tsv"
    ).read_text()

    # evaluate: A→B alone
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    view = make_test_data(tmp_path / "view", n=4, size=24)
    paths = replace(paths_in(tmp_path / "eval", view, out), train_live=tmp_path / "l2")
    summary = evaluate(EvaluateParams(samples=2, kid_subsets=3), paths)
    m = tmp_path / "eval" / "metrics"
    table = pd.read_csv(m / "eval_epochs.csv")
    assert list(table.columns) == ["epoch", "fid_AtoB", "kid_AtoB", "kid_std_AtoB", "fid", "kid"]
    assert (table.kid == table.kid_AtoB).all()
    numbers = json.loads((m / "eval.json").read_text())
    assert list(numbers)[:2] == ["kid", "fid"] and "kid_BtoA" not in numbers
    assert numbers["best_epoch"] == int(table.loc[table.kid.idxmin(), "epoch"])
    assert summary["best_reason"] == "lowest KID of A→B (the run's one direction)"
    assert "One direction" in summary["protocol"]
    report = (m / "report.html").read_text()
    assert "B→A ±" not in report and "B→A is neither trained nor scored" in report
    assert "PatchNCE" in report and "cycle consistency" not in report  # its own loss panels
    assert sorted(p.name for p in (m / "eval_plots").glob("*.tsv")) == [
        "fid_AtoB.tsv",
        "kid_AtoB.tsv",
    ]
    assert sorted(p.name for p in (m / "test_set").iterdir() if p.is_dir()) == ["AtoB"]
    assert sorted(p.name for p in (m / "test_set" / "AtoB").iterdir()) == ["fake", "real"]
    best = tmp_path / "eval" / "best" / "generators.pt"

    # translate and export: A→B works, B→A is refused in one line
    with pytest.raises(UserError, match=f"{model} checkpoint has one generator, A→B") as err:
        checkpoint.load_generator(best, "BtoA")
    assert "\n" not in str(err.value)
    import onnxruntime as ort

    onnx = export_onnx(str(best), str(tmp_path / "g.onnx"), "AtoB")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    net, _ = checkpoint.load_generator(best, "AtoB")
    x = torch.rand(1, 3, 22, 30) * 2 - 1
    with torch.no_grad():
        want = pad_crop_forward(net, x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - want).max() <= 1e-4


def test_switching_train_model_starts_afresh_and_says_why(tmp_path, data, capsys):
    """A last.pt of another train.model is set aside with the switch named (it said "lacks opt_F,
    sched_F (written by an older version of train, or edited)")."""
    p = replace(TINY, epochs=1, epochs_decay=0)
    train(replace(p, model="fastcut"), data, tmp_path / "ckpt", tmp_path / "l1")
    capsys.readouterr()
    train(p, data, tmp_path / "ckpt", tmp_path / "l2")
    out = capsys.readouterr().out
    assert "was written with train.model fastcut -> cut; moved the earlier checkpoints" in out, out
    assert "older version" not in out
    assert checkpoint.load(tmp_path / "ckpt" / "last.pt")["run_params"]["model"] == "cut"


def test_fastcut_trains_with_its_own_defaults(tmp_path, data):
    """FastCUT: no identity NCE (NCE_Y stays 0), flips, λ_NCE 10; the same bytes twice (its flips
    come from the seeded generator)."""
    p = replace(TINY, model="fastcut", epochs=1, epochs_decay=0)
    train(p, data, tmp_path / "one", tmp_path / "l1")
    train(p, data, tmp_path / "two", tmp_path / "l2")
    assert (tmp_path / "one" / "last.pt").read_bytes() == (
        tmp_path / "two" / "last.pt"
    ).read_bytes()
    logs = tmp_path / "l1" / "plots" / "metrics"
    assert pd.read_csv(logs / "NCE_Y.tsv", sep="\t").NCE_Y.tolist() == [0.0]
    assert checkpoint.load(tmp_path / "one" / "epoch_001.pt")["model"]["kind"] == "fastcut"


def test_cut_trains_from_disk_and_in_bf16_like_cyclegan(tmp_path, data, capsys):
    """The stage's shared switches work for CUT as for CycleGAN: data_device disk gives the weights
    of images decoded into memory bit for bit; precision bf16 (autocast) trains to finite losses
    and last.pt records the precision it resolved to."""
    p = replace(TINY, epochs=1, epochs_decay=0)
    train(replace(p, data_device="device"), data, tmp_path / "memory", tmp_path / "l1")
    train(replace(p, data_device="disk"), data, tmp_path / "disk", tmp_path / "l2")
    assert same(weights(tmp_path / "memory" / "last.pt"), weights(tmp_path / "disk" / "last.pt"))
    train(replace(p, precision="bf16"), data, tmp_path / "bf16", tmp_path / "l3")
    last = checkpoint.load(tmp_path / "bf16" / "last.pt")
    assert last["precision"] == "bf16"
    nce = pd.read_csv(tmp_path / "l3" / "plots" / "metrics" / "NCE.tsv", sep="\t").NCE
    assert np.isfinite(nce).all() and (nce > 0).all()
    assert not same(
        weights(tmp_path / "memory" / "last.pt"), weights(tmp_path / "bf16" / "last.pt")
    )


def test_every_preset_takes_cut_and_fastcut_as_its_only_change():
    """`dvc exp run -S train.model=cut` (or fastcut) on any preset is valid as it stands: no preset
    sets a CycleGAN-only key away from its default, and its G is deep enough for the NCE layers."""
    import yaml

    from tests.helpers import ROOT
    from unpaired import presets

    names = sorted(f.stem for f in (ROOT / "conf" / "preset").glob("*.yaml"))
    assert "horse2zebra" in names
    for name in names:
        train_section = yaml.safe_load(presets.compose(ROOT / "conf", name))["train"]
        for model in ("cut", "fastcut"):
            p = parse(TrainParams, {**train_section, "model": model}, "train")
            assert p.resolved("antialias") and p.n_blocks >= 5, name
