"""docs/params.md cannot drift: it is generated from the params dataclasses' field comments (the one
place a param is documented), and these tests fail while the committed page differs."""

import dataclasses
import shutil
import subprocess
import sys

from tests.helpers import ROOT
from unpaired import params_doc


def test_the_committed_params_page_is_what_the_classes_give():
    assert (ROOT / "docs" / "params.md").read_text() == params_doc.render(), (
        "docs/params.md is stale: run `uv run python -m unpaired.params_doc`"
    )


def test_every_field_of_every_params_section_has_a_doc():
    for _, key, cls in params_doc.sections():
        docs = params_doc.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert undocumented == [], f"{key}: no comment on the field line of {undocumented}"


def test_a_doc_changed_in_its_class_alone_fails_the_check(tmp_path):
    """Edit one field's comment in a copy of the project, and --check names the stale page."""
    copy = tmp_path / "project"
    shutil.copytree(
        ROOT / "unpaired", copy / "unpaired", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(ROOT / "docs", copy / "docs")
    source = copy / "unpaired" / "models" / "training.py"
    text = source.read_text()
    old = "# Adam's learning rate (paper: 0.0002)"
    assert old in text
    source.write_text(text.replace(old, "# Adam's step size (paper: 0.0002)"))

    def check():
        return subprocess.run(
            [sys.executable, "-m", "unpaired.params_doc", "--check"],
            cwd=copy,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(copy), "PATH": ""},
        )

    stale = check()
    assert stale.returncode == 1 and "docs/params.md differs" in stale.stderr, stale.stderr
    subprocess.run(
        [sys.executable, "-m", "unpaired.params_doc"],
        cwd=copy,
        check=True,
        capture_output=True,
        env={"PYTHONPATH": str(copy), "PATH": ""},
    )
    assert "Adam's step size" in (copy / "docs" / "params.md").read_text()
    assert check().returncode == 0


def test_field_docs_reads_the_lines_above_and_the_fields_own_line():
    @dataclasses.dataclass
    class Demo:
        a: int = 1  # on its line
        # a plain comment is not a doc
        #: above,
        #: two lines
        b: int = 2  # and its own
        c: int = 3

    assert params_doc.field_docs(Demo) == {
        "a": "on its line",
        "b": "above, two lines and its own",
        "c": "",
    }
