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


@pytest.mark.parametrize("name", FOLDERS)
def test_component_folder_has_readme_naming_every_input_and_output(name: str) -> None:
    readme = (ROOT / "components" / name / "README.md").read_text()
    spec = COMPONENTS[name].component_spec
    for io_name in list(spec.inputs or {}) + list(spec.outputs or {}):
        assert f"`{io_name}`" in readme, f"{name}/README.md does not describe {io_name}"
    assert "```python" in readme, f"{name}/README.md has no example"


@pytest.mark.parametrize("name", FOLDERS)
def test_component_docstring_documents_every_parameter(name: str) -> None:
    spec = COMPONENTS[name].component_spec
    for io_name, io in (spec.inputs or {}).items():
        assert io.description, f"{name}: {io_name} has no description in the Args: section"
    # KFP keeps output descriptions only in the component description (the docstring)
    doc = COMPONENTS[name].python_func.__doc__
    for io_name in spec.outputs or {}:
        if io_name == "Output":  # a return value: documented under Returns:
            assert "\n    Returns:\n" in doc, f"{name}: its return value is not documented"
            continue
        assert f"        {io_name}: " in doc, f"{name}: output {io_name} is not documented"


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
