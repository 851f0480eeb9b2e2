"""The pages' stylesheets and script, as package data beside this file (read with importlib.resources,
so they travel with the wheel):

- report.css, report.js: metrics/report.html (unpaired/report.py). report.js reads two constants the
  page defines just before it: `epochs` (the epochs with a sample grid) and `best` (the best epoch).
- test_set.css: metrics/test_set/*.html (unpaired/report.py).
- dataset.css: metrics/data/index.html, the dataset page (unpaired/dataset_page.py).

The pages embed them inline (each page must open offline, alone). dvc.yaml lists this folder in the
deps of every stage that imports it, so an edited stylesheet re-runs the stage that writes the page
(tests/test_structure.py checks).
"""

from __future__ import annotations

from importlib.resources import files


def text(name: str) -> str:
    """The file `name` of this folder as UTF-8 text, without its final newline (the page writes its
    own line breaks around it). Raises FileNotFoundError for a name that is not here."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8").removesuffix("\n")
