"""Packaging: components and pipelines install under preftune, each component folder is complete."""

from __future__ import annotations

import ast

import pytest
import tomllib

from preftune.components import COMPONENTS
from preftune.orchestration import compilation

ROOT = compilation.source_root()
FOLDERS = sorted(p.name for p in (ROOT / "components").iterdir() if (p / "component.py").is_file())


def test_every_component_folder_is_registered_and_packaged() -> None:
    assert sorted(COMPONENTS) == FOLDERS
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    for name in FOLDERS:
        assert f"preftune.components.{name}" in packages
    # nothing generic lands in site-packages: every package lives under preftune
    assert all(p == "preftune" or p.startswith("preftune.") for p in packages)


def test_every_library_subpackage_is_in_the_wheel() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    on_disk = {".".join(p.parent.relative_to(src).parts) for p in (src / "preftune").rglob("__init__.py")}
    assert on_disk - packages == set(), "add these to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.parametrize("name", FOLDERS)
def test_component_folder_has_readme_naming_every_input_and_output(name: str) -> None:
    readme = (ROOT / "components" / name / "README.md").read_text()
    spec = COMPONENTS[name].component_spec
    for io_name in list(spec.inputs or {}) + list(spec.outputs or {}):
        assert f"`{io_name}`" in readme, f"{name}/README.md does not describe {io_name}"
    assert "```python" in readme, f"{name}/README.md has no example"


@pytest.mark.parametrize("name", FOLDERS)
def test_component_docstring_documents_every_input_and_output(name: str) -> None:
    """KFP reads inputs from Args: and outputs (artifacts and the return value) from Returns:."""
    spec = COMPONENTS[name].component_spec
    for io_name, io in {**(spec.inputs or {}), **(spec.outputs or {})}.items():
        assert io.description, f"{name}: {io_name} has no description in the docstring"


@pytest.mark.parametrize("name", FOLDERS)
def test_component_body_imports_preftune_and_nothing_heavy_at_module_level(name: str) -> None:
    tree = ast.parse((ROOT / "components" / name / "component.py").read_text())
    top_imports = [
        n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom) and not isinstance(n, ast.Expr)
    ]
    modules = {getattr(n, "module", None) or n.names[0].name for n in top_imports}
    assert not any(m and m.startswith(("torch", "transformers", "preftune.train")) for m in modules)


def test_library_never_imports_kfp_outside_the_command_line_side() -> None:
    allowed = {"runner.py", "cli.py", "compilation.py", "kfp_api.py"}  # the command-line side
    for path in (ROOT / "src" / "preftune").rglob("*.py"):
        if path.name in allowed:
            continue
        text = path.read_text()
        assert "import kfp" not in text and "from kfp" not in text, path
