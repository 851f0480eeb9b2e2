"""Presets: conf/preset/*.yaml, composed into params.yaml by DVC's Hydra support
(`dvc exp run -S preset=<name>`)."""
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
from stages.prepare import PrepareParams
from unpaired.training import TrainParams
from tests.helpers import ROOT, TINY, clone_project, committed_params, dvc
from tests.test_sources_files import Server
from unpaired.params import parse
from unpaired.sources import archive, doodles, flares, folder, kaggle, quickdraw, stylegan, web

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "preset").glob("*.yaml"))
DOMAIN_PARAMS = {"doodles": doodles.DoodleParams, "flares": flares.FlareParams, "archive": archive.ArchiveParams,
                 "folder": folder.FolderParams, "quickdraw": quickdraw.QuickDrawParams,
                 "kaggle": kaggle.KaggleParams, "web": web.WebParams, "stylegan": stylegan.StyleGANParams}


def compose(tmp_path, *overrides):
    from dvc.utils.hydra import compose_and_dump
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), list(overrides))
    return YAML(typ="safe").load(out.read_text())    # YAML 1.2, as DVC and the stages read it


def test_the_issue_presets_exist_and_are_documented():
    assert PRESETS == sorted(["doodles2flares", "dragons2flares", "oxen2flares", "simpsons2faces",
                              "horse2zebra", "forest2abstract"])
    readme = (ROOT / "README.md").read_text()
    for name in PRESETS:
        assert f"`{name}`" in readme


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_into_valid_params(tmp_path, name):
    params = compose(tmp_path, f"preset={name}")
    assert params["preset"] == name and set(params["domains"]) == {"a", "b"}
    for domain, spec in params["domains"].items():
        spec = dict(spec)
        parse(DOMAIN_PARAMS[spec.pop("source")], spec, f"domains.{domain}")
    parse(PrepareParams, params["prepare"], "prepare")
    parse(TrainParams, params["train"], "train")
    parse(EvaluateParams, params["evaluate"], "evaluate")


def test_default_preset_is_the_committed_params_yaml(tmp_path):
    # The committed file, not the working copy: the README invites users to edit params.yaml.
    assert compose(tmp_path) == YAML(typ="safe").load(committed_params())


def test_params_yaml_comments_live_in_conf(tmp_path):
    """`dvc exp run` rewrites params.yaml without comments: the explanations must be in conf/, and
    params.yaml is the composition itself under a header saying so."""
    lines = committed_params().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert lines[:len(header)] == header and "generated from conf/" in header[0]
    assert "git checkout params.yaml" in " ".join(header)
    out = tmp_path / "params.yaml"
    from dvc.utils.hydra import compose_and_dump
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), [])
    assert lines[len(header):] == out.read_text().splitlines()     # regenerating loses only the header
    config = (ROOT / "conf" / "config.yaml").read_text()
    assert "# output width = height in pixels" in config and "git checkout params.yaml" in config


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
    assert {Meta.PARAM_SIZE, Meta.PARAM_NFILES} == RUN_CACHE_BLIND    # what this DVC leaves out
    trees = {"params.yaml": YAML(typ="safe").load(committed_params())}
    trees |= {f"preset={name}": compose(tmp_path, f"preset={name}") for name in PRESETS}
    bad = [f"{where}: {dotted}" for where, tree in trees.items()
           for dotted, key in leaf_keys(tree) if key in RUN_CACHE_BLIND]
    # ... and every key a dataclass accepts, including those no preset sets.
    classes = {**DOMAIN_PARAMS, "prepare": PrepareParams, "train": TrainParams, "evaluate": EvaluateParams}
    bad += [f"{name}.{f.name}" for name, cls in classes.items() for f in dataclasses.fields(cls)
            if f.name in RUN_CACHE_BLIND]
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
        args = ["exp", "run", "-S", "preset=horse2zebra", "-S", f"domains.a.url='{url}'",
                "-S", f"domains.b.url='{url}'"]
        for o in tiny_overrides():
            args += ["-S", o]
        dvc(repo, *args)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert params["preset"] == "horse2zebra" and params["train"]["ngf"] == TINY["train"]["ngf"]
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert lock["fetch@a"]["params"]["params.yaml"]["domains.a"]["url"] == url
        assert lock["fetch@b"]["params"]["params.yaml"]["domains.b"]["member"] == "horse2zebra/trainB"
        assert lock["train"]["params"]["params.yaml"]["train"]["n_blocks"] == TINY["train"]["n_blocks"]
        assert len(list((repo / "data" / "raw" / "a").glob("*.jpg"))) == 8
        assert list((repo / "models" / "checkpoints").glob("epoch_*.pt"))
        assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}
        assert server.hits["/cyclegan/datasets/horse2zebra.zip"] == 1    # one download serves both domains
    finally:
        server.close()
