"""Heavy libraries load only where they are used: storage, the registry, the HTML reports and the launcher import
without torch, matplotlib or kfp; the configs and the command line without torch or matplotlib; and matplotlib
comes in with the first chart drawn.

Each import runs in a fresh interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("matplotlib", "torch", "transformers", "peft", "accelerate", "datasets", "kfp")


def _loaded_after(code: str) -> set[str]:
    """Which of HEAVY a fresh interpreter has in sys.modules after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    [
        "preftune.io.storage",
        "preftune.io.registry",
        "preftune.report.html",
        "preftune.report.charts",
        "preftune.launch.stages",
        "preftune.launch.distributed",
        "preftune.eval.promotion",
    ],
)
def test_light_modules_import_nothing_heavy(module: str) -> None:
    assert _loaded_after(f"import {module}") == set()


@pytest.mark.parametrize(
    "module", ["preftune.config.sft", "preftune.config.dpo", "preftune.orchestration.cli"]
)
def test_the_parameter_surface_and_the_command_line_import_without_torch_or_matplotlib(module: str) -> None:
    assert _loaded_after(f"import {module}") & {"torch", "matplotlib"} == set()


def test_matplotlib_loads_with_the_first_chart_and_draws_headless() -> None:
    code = (
        "from preftune.report import html\n"
        "import sys\n"
        "assert 'matplotlib' not in sys.modules\n"
        "tag = html.line_chart({'loss': [(0, 1.0), (1, 0.5)]}, 'loss')\n"
        "assert tag.startswith(\"<div class='chart'><img\") and 'base64,' in tag\n"
        "import matplotlib\n"
        "assert matplotlib.get_backend().lower() == 'agg'\n"
    )
    assert _loaded_after(code) == {"matplotlib"}
