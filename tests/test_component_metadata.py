"""Every component folder carries a metadata.yaml (kubeflow/pipelines-components): a name, a one-line description,
a stability, the dependency versions it was verified with and when. The versions must match the environment the
tests run in, so upgrading a dependency without re-verifying the components fails here instead of going stale.
"""

from __future__ import annotations

import ast
import datetime as dt
import fnmatch
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.parent.name for p in (ROOT / "components").glob("*/component.py"))
REQUIRED = {"name", "description", "tier", "stability", "owners", "dependencies", "lastVerified"}
STABILITIES = {"alpha", "beta", "stable"}
#: How long a verification holds (kubeflow/pipelines-components removes assets not re-verified within a year).


def _metadata(name: str) -> dict:
    return yaml.safe_load((ROOT / "components" / name / "metadata.yaml").read_text(encoding="utf-8"))


def _summary(name: str) -> str:
    tree = ast.parse((ROOT / "components" / name / "component.py").read_text(encoding="utf-8"))
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_docstring(function).splitlines()[0]


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def _major_minor(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_every_component_folder_has_metadata() -> None:
    assert FOLDERS, "no component folders found"
    missing = [name for name in FOLDERS if not (ROOT / "components" / name / "metadata.yaml").is_file()]
    assert missing == []


@pytest.mark.parametrize("name", FOLDERS)
def test_metadata_describes_the_component(name: str) -> None:
    meta = _metadata(name)
    assert set(meta) >= REQUIRED, f"{name}: missing {sorted(REQUIRED - set(meta))}"
    assert meta["name"] == name
    assert "\n" not in meta["description"] and meta["description"] == _summary(name), (
        f"{name}: the description is the first line of the component's docstring"
    )
    assert meta["tier"] == "core" and meta["stability"] in STABILITIES
    assert meta["owners"] and all(isinstance(o, str) and o for o in meta["owners"])
    assert all(isinstance(t, str) and t for t in meta.get("tags", []))
    kubeflow = {d["name"]: d["version"] for d in meta["dependencies"]["kubeflow"]}
    assert "Pipelines" in kubeflow


@pytest.mark.parametrize("name", FOLDERS)
def test_tested_versions_are_the_installed_ones(name: str) -> None:
    tested = dict(_metadata(name)["dependencies"]["tested"])
    assert _major_minor(str(tested.pop("python"))) == sys.version_info[:2]
    assert "kfp" in tested, f"{name}: a component is tested with the kfp SDK"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = {_distribution(r) for r in pyproject["project"]["dependencies"]}
    stale = []
    for package, wanted in tested.items():
        assert package.lower() in declared, f"{name}: {package} is not a declared runtime dependency"
        try:
            installed = version(package)
        except PackageNotFoundError:
            stale.append(f"{package}: not installed")
            continue
        if _major_minor(installed) != _major_minor(str(wanted)):
            stale.append(f"{package}: verified with {wanted}, installed {installed}")
    assert stale == [], f"{name}: re-verify the component and update components/{name}/metadata.yaml: {stale}"


@pytest.mark.parametrize("name", FOLDERS)
def test_last_verified_is_a_date_not_in_the_future(name: str) -> None:
    # Staleness is caught by the tested versions, which must match the installed packages; a date-driven
    # failure would break CI on a calendar day with no change to the code.
    verified = _metadata(name)["lastVerified"]
    assert isinstance(verified, dt.datetime) and verified.tzinfo is not None, "RFC 3339, with a time zone"
    assert verified <= dt.datetime.now(dt.timezone.utc), f"{name}: last verified {verified:%Y-%m-%d} is ahead"


def test_the_wheel_ships_the_metadata() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["preftune.components"]
    assert any(fnmatch.fnmatch("sft/metadata.yaml", p) for p in patterns), (
        'add "*/metadata.yaml" to [tool.setuptools.package-data] "preftune.components" in pyproject.toml'
    )
