"""Presets: conf/preset/*.yaml laid over conf/config.yaml into params.yaml by `unpaired preset NAME`
(unpaired/presets.py); params.yaml is then the one file runs read."""

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image
from ruamel.yaml import YAML

from stages.evaluate import EvaluateParams
from tests.helpers import ROOT, TINY, VENV_BIN, clone_project, committed_params, dvc, run
from tests.test_sources_files import Server
from unpaired import presets
from unpaired.models.training import TrainParams
from unpaired.params import parse
from unpaired.prepare import PrepareParams
from unpaired.sources import archive, doodles, flares, folder, kaggle, quickdraw, stylegan, web

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "preset").glob("*.yaml"))
DOMAIN_PARAMS = {
    "doodles": doodles.DoodleParams,
    "flares": flares.FlareParams,
    "archive": archive.ArchiveParams,
    "folder": folder.FolderParams,
    "quickdraw": quickdraw.QuickDrawParams,
    "kaggle": kaggle.KaggleParams,
    "web": web.WebParams,
    "stylegan": stylegan.StyleGANParams,
}


def compose(tmp_path, name="doodles2flares"):
    """The params.yaml `unpaired preset NAME` writes, read as DVC reads it (YAML 1.2)."""
    return YAML(typ="safe").load(presets.compose(ROOT / "conf", name))


def test_the_issue_presets_exist_and_are_documented():
    assert PRESETS == sorted(
        [
            "doodles2flares",
            "dragons2flares",
            "oxen2flares",
            "simpsons2faces",
            "horse2zebra",
            "forest2abstract",
        ]
    )
    readme = (ROOT / "README.md").read_text()
    for name in PRESETS:
        assert f"`{name}`" in readme


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_into_valid_params(tmp_path, name):
    params = compose(tmp_path, name)
    assert params["preset"] == name and set(params["domains"]) == {"a", "b"}
    for domain, spec in params["domains"].items():
        spec = dict(spec)
        parse(DOMAIN_PARAMS[spec.pop("source")], spec, f"domains.{domain}")
    parse(PrepareParams, params["prepare"], "prepare")
    parse(TrainParams, params["train"], "train")
    parse(EvaluateParams, params["evaluate"], "evaluate")


def test_default_preset_is_the_committed_params_yaml():
    # The committed file, not the working copy: the README invites users to edit params.yaml.
    # Text, not values: its comments explaining each key come from the params classes' field docs.
    assert presets.compose(ROOT / "conf", "doodles2flares") == committed_params()
    text = committed_params()
    assert "# output width = height in pixels" in text and "unpaired preset NAME" in text


def test_dvc_hydra_composition_is_off():
    """With Hydra on, every `dvc exp run` rewrote params.yaml from conf/ and dropped hand edits."""
    assert "hydra" not in (ROOT / ".dvc" / "config").read_text()


# DVC's run cache drops every mapping key named like these from its key (dvc/stage/cache.py,
# `_get_cache_hash` excludes Meta.PARAM_SIZE and Meta.PARAM_NFILES), params included: a change to
# such a param would be answered from the run cache with the old outputs.
RUN_CACHE_BLIND = {"size", "nfiles"}


def leaf_keys(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield f"{prefix}{k}", k
            yield from leaf_keys(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from leaf_keys(v, f"{prefix}{i}.")


def test_no_param_is_named_what_dvcs_run_cache_ignores(tmp_path):
    from dvc_data.hashfile.meta import Meta

    assert {Meta.PARAM_SIZE, Meta.PARAM_NFILES} == RUN_CACHE_BLIND  # what this DVC leaves out
    trees = {"params.yaml": YAML(typ="safe").load(committed_params())}
    trees |= {f"preset={name}": compose(tmp_path, name) for name in PRESETS}
    bad = [
        f"{where}: {dotted}"
        for where, tree in trees.items()
        for dotted, key in leaf_keys(tree)
        if key in RUN_CACHE_BLIND
    ]
    # ... and every key a dataclass accepts, including those no preset sets.
    classes = {
        **DOMAIN_PARAMS,
        "prepare": PrepareParams,
        "train": TrainParams,
        "evaluate": EvaluateParams,
    }
    bad += [
        f"{name}.{f.name}"
        for name, cls in classes.items()
        for f in dataclasses.fields(cls)
        if f.name in RUN_CACHE_BLIND
    ]
    assert not bad


def zebra_zip() -> bytes:
    """Laid out like horse2zebra.zip: horse2zebra/{trainA,trainB,testA,testB}/*.jpg."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("trainA", "trainB", "testA", "testB"):
            for i in range(8):
                img = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img, "JPEG")
                z.writestr(f"horse2zebra/{split}/n02381460_{i}.jpg", img.getvalue())
    return buf.getvalue()


def tiny_overrides() -> list[str]:
    out = []
    for section in ("prepare", "train", "evaluate"):
        out += [f"{section}.{k}={v}" for k, v in TINY[section].items()]
    return out


def test_switching_preset_is_one_command_and_dvc_lock_records_it(tmp_path):
    server = Server()
    try:
        server.routes["/cyclegan/datasets/horse2zebra.zip"] = (200, zebra_zip(), "")
        url = f"{server.url}/cyclegan/datasets/horse2zebra.zip"
        repo = clone_project(tmp_path / "project")
        switched = run([str(VENV_BIN / "unpaired"), "preset", "horse2zebra"], cwd=repo)
        assert "domains.a.source: 'doodles' -> 'archive'" in switched.stdout
        args = ["exp", "run", "-S", f"domains.a.url='{url}'", "-S", f"domains.b.url='{url}'"]
        for o in tiny_overrides():
            args += ["-S", o]
        dvc(repo, *args)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert params["preset"] == "horse2zebra" and params["train"]["ngf"] == TINY["train"]["ngf"]
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert lock["fetch@a"]["params"]["params.yaml"]["domains.a"]["url"] == url
        assert (
            lock["fetch@b"]["params"]["params.yaml"]["domains.b"]["member"] == "horse2zebra/trainB"
        )
        assert (
            lock["train"]["params"]["params.yaml"]["train"]["n_blocks"] == TINY["train"]["n_blocks"]
        )
        assert len(list((repo / "data" / "raw" / "a").glob("*.jpg"))) == 8
        assert list((repo / "models" / "checkpoints").glob("epoch_*.pt"))
        assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}
        assert (
            server.hits["/cyclegan/datasets/horse2zebra.zip"] == 1
        )  # one download serves both domains
    finally:
        server.close()


def _conf(tmp_path, preset_text, config_extra=""):
    """A conf/ folder: the project's config.yaml (+ extra text) and one preset `p`."""
    conf = tmp_path / "conf"
    (conf / "preset").mkdir(parents=True)
    (conf / "config.yaml").write_text((ROOT / "conf" / "config.yaml").read_text() + config_extra)
    (conf / "preset" / "p.yaml").write_text(preset_text)
    (conf / "preset" / "q.yaml").write_text("preset: q\ntrain:\n  ngf: 8\n")
    return conf


def test_switching_prints_each_change_and_keeps_edits_only_when_asked(tmp_path, capsys):
    from unpaired.cli import main

    conf = _conf(tmp_path, "preset: p\ntrain:\n  ngf: 32\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(presets.compose(conf, "p"))
    params_file.write_text(
        params_file.read_text().replace("lr: 0.0002", "lr: 0.0001")
    )  # a hand edit
    args = ["preset", "q", "--params", str(params_file), "--conf", str(conf)]
    main(args + ["--keep-edits"])
    out = capsys.readouterr().out
    assert "  train.ngf: 32 -> 8" in out and "  preset: 'p' -> 'q'" in out
    assert "  kept your edit train.lr: 0.0001" in out and "train.lr: 0.0001 ->" not in out
    switched = YAML(typ="safe").load(params_file.read_text())
    assert switched["train"]["lr"] == 0.0001 and switched["train"]["ngf"] == 8
    assert "# generator width (paper: 64)" in params_file.read_text()  # comments kept
    main(
        ["preset", "p", "--params", str(params_file), "--conf", str(conf)]
    )  # without: dropped, said
    out = capsys.readouterr().out
    assert "  train.lr: 0.0001 -> 0.0002" in out
    assert "  dropped your edit train.lr: 0.0001 (pass --keep-edits to keep it)" in out
    assert params_file.read_text() == presets.compose(conf, "p")
    main(["preset", "p", "--params", str(params_file), "--conf", str(conf)])
    assert "already preset p; nothing changed" in capsys.readouterr().out


def test_an_edit_the_new_preset_sets_is_replaced_and_said(tmp_path, capsys):
    from unpaired.cli import main

    conf = _conf(tmp_path, "preset: p\ntrain:\n  ngf: 32\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(presets.compose(conf, "p").replace("ngf: 32", "ngf: 12"))
    main(["preset", "q", "--keep-edits", "--params", str(params_file), "--conf", str(conf)])
    out = capsys.readouterr().out
    assert "  dropped your edit train.ngf: 12: preset q sets it to 8" in out


def test_an_unknown_preset_is_one_line_and_touches_nothing(tmp_path, capsys):
    from unpaired.cli import main

    conf = _conf(tmp_path, "preset: p\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train: {}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["preset", "zebra", "--params", str(params_file), "--conf", str(conf)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unknown preset 'zebra'; known presets: p, q (conf/preset/)\n"
    assert params_file.read_text() == "train: {}\n"


# Texts that YAML 1.1 (PyYAML, Hydra/OmegaConf) reads differently from DVC (ruamel.yaml, YAML 1.2;
# ruamel accepts `1_000` as 1000 there too): on/off/yes/no stay strings, `1:20` is no base-60 4800,
# `017` no octal 15.
YAML_11_VS_12 = {
    "on": "on",
    "off": "off",
    "yes": "yes",
    "no": "no",
    "1_000": 1000,
    "1:20": "1:20",
    "017": 17,
}


@pytest.mark.parametrize("text", list(YAML_11_VS_12))
def test_conf_and_presets_read_like_dvc_reads_params_yaml(tmp_path, text):
    """The same text means the same value in conf/config.yaml, a preset and params.yaml, as DVC
    reads params.yaml (YAML 1.2): `off` stays the string "off", never false."""
    from dvc.utils.serialize import load_yaml

    conf = _conf(
        tmp_path, f"preset: p\nevaluate:\n  metrics: {text}\n", f"\ndomains:\n  a:\n    x: {text}\n"
    )
    out = tmp_path / "params.yaml"
    out.write_text(presets.compose(conf, "p"))
    ours, dvcs = YAML(typ="safe").load(out.read_text()), load_yaml(str(out))
    assert ours == dvcs
    assert ours["evaluate"]["metrics"] == YAML_11_VS_12[text] == ours["domains"]["a"]["x"]
    from unpaired import params

    assert params.load(out)["evaluate"]["metrics"] == YAML_11_VS_12[text]


def test_a_conf_change_params_yaml_does_not_have_is_one_line(tmp_path):
    conf = _conf(tmp_path, "preset: p\ntrain:\n  ngf: 32\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(presets.compose(conf, "p"))
    assert presets.stale_composition(params_file, conf) is None
    params_file.write_text(
        params_file.read_text().replace("ngf: 32", "ngf: 12")
    )  # a hand edit: fine
    assert presets.stale_composition(params_file, conf) is None
    (conf / "preset" / "p.yaml").write_text("preset: p\ntrain:\n  ngf: 48\n")
    line = presets.stale_composition(params_file, conf)
    assert line is not None and "\n" not in line
    assert (
        "conf/preset/p.yaml, which changed since" in line
        and "unpaired preset p --keep-edits" in line
    )
    params_file.write_text("train: {}\n")  # written by hand
    assert presets.stale_composition(params_file, conf) is None


# --- issue 24.9: `preset NAME --keep-edits` with the preset in force keeps every edit ----------------

P_WITH_DOMAINS = (
    "preset: p\ndomains:\n  a:\n    source: doodles\n    count: 240\n    image_size: 64\n"
    "  b:\n    source: flares\n    count: 240\n    image_size: 64\ntrain:\n  ngf: 32\n"
)


def _git(cwd, *args):
    import subprocess

    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.parametrize("conf_change", ["uncommitted", "committed"])
def test_keep_edits_on_the_preset_in_force_keeps_every_edit_and_applies_the_conf_change(
    tmp_path, capsys, conf_change
):
    """make repro's stale-composition warning recommends `unpaired preset p --keep-edits`; that
    command dropped the user's count and image_size edits (the preset sets those keys), and its
    change count counted the kept edits, whose values do not change. Edits are measured against the
    composition params.yaml records (found in git when conf/ changed since)."""
    from unpaired.cli import main

    conf = _conf(tmp_path, P_WITH_DOMAINS)
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "add", "conf")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "conf")
    params_file = tmp_path / "params.yaml"
    head, domains = (
        presets.compose(conf, "p").replace("lr: 0.0002", "lr: 0.0001").split("\ndomains:\n")
    )
    domains = domains.replace("count: 240", "count: 12", 1).replace(
        "image_size: 64", "image_size: 32", 1
    )
    params_file.write_text(f"{head}\ndomains:\n{domains}")  # domain a's count and size edited
    edited = YAML(typ="safe").load(params_file.read_text())
    assert (edited["domains"]["a"]["count"], edited["domains"]["a"]["image_size"]) == (12, 32)
    (conf / "preset" / "p.yaml").write_text(
        P_WITH_DOMAINS.replace("ngf: 32", "ngf: 48")
    )  # conf/ edited
    if conf_change == "committed":
        _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "ngf 48")
    warning = presets.stale_composition(params_file, conf)
    assert "`uv run unpaired preset p --keep-edits`" in warning
    main(["preset", "p", "--keep-edits", "--params", str(params_file), "--conf", str(conf)])
    out = capsys.readouterr().out
    assert f"{params_file}: preset p; 1 change(s):\n  train.ngf: 32 -> 48\n" in out, out
    for kept in ("domains.a.count: 12", "domains.a.image_size: 32", "train.lr: 0.0001"):
        assert f"  kept your edit {kept}\n" in out, out
    assert "dropped" not in out
    switched = YAML(typ="safe").load(params_file.read_text())
    assert switched == {**edited, "train": {**edited["train"], "ngf": 48}}
    assert presets.stale_composition(params_file, conf) is None
    main(["preset", "p", "--keep-edits", "--params", str(params_file), "--conf", str(conf)])
    assert "already preset p; nothing changed" in capsys.readouterr().out


def test_keep_edits_without_the_recorded_composition_says_so(tmp_path, capsys):
    """conf/ changed and not in git: the composition params.yaml was written from is unknown; the
    line says that the values it holds where conf/ changed count as edits."""
    from unpaired.cli import main

    conf = _conf(tmp_path, P_WITH_DOMAINS)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(presets.compose(conf, "p").replace("count: 240", "count: 12", 1))
    (conf / "preset" / "p.yaml").write_text(P_WITH_DOMAINS.replace("ngf: 32", "ngf: 48"))
    main(["preset", "p", "--keep-edits", "--params", str(params_file), "--conf", str(conf)])
    out = capsys.readouterr().out
    assert "  kept your edit domains.a.count: 12\n" in out
    assert "git holds no version of it with the recorded digest" in out
