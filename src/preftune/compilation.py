"""Compile components and pipelines to the YAML files committed beside their sources.

The compiled YAML is what a platform team uploads to Kubeflow or loads with
``kfp.components.load_component_from_file``; ``check`` keeps the committed files honest in CI.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SDK_VERSION = re.compile(r"^(\s*sdkVersion:).*$", re.MULTILINE)


def source_root() -> Path:
    """The directory holding components/ and pipelines/ (the source checkout)."""
    import preftune.components

    return Path(preftune.components.__file__).resolve().parent.parent


def targets(root: Path | None = None) -> list[tuple[Any, Path]]:
    """Every component and pipeline with the YAML path it compiles to."""
    from preftune.components import COMPONENTS
    from preftune.pipelines import PIPELINES

    root = root or source_root()
    found: list[tuple[Any, Path]] = []
    for name, component in COMPONENTS.items():
        found.append((component, root / "components" / name / "component.yaml"))
    for name, pipeline in PIPELINES.items():
        found.append((pipeline, root / "pipelines" / f"{name}.yaml"))
    return found


def normalise(text: str) -> str:
    """YAML text with the SDK version blanked, so a KFP upgrade alone does not make files stale."""
    return _SDK_VERSION.sub(r"\1 <any>", text)


def _compile(obj: Any, path: Path) -> None:
    from kfp import compiler

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(obj, str(path))


def compile_all(root: Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Write every component.yaml and pipeline YAML; return the paths written."""
    written = []
    for obj, path in targets(root):
        _compile(obj, path)
        log(f"wrote {path}")
        written.append(path)
    return written


def stale(root: Path | None = None) -> list[Path]:
    """Committed YAML files that are missing or differ from a fresh compile (SDK version ignored)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (obj, path) in enumerate(targets(root)):
            fresh = Path(tmp) / f"{i}.yaml"
            _compile(obj, fresh)
            if not path.is_file() or normalise(path.read_text(encoding="utf-8")) != normalise(
                fresh.read_text(encoding="utf-8")
            ):
                out.append(path)
    return out
