"""Compiled YAML: loads back, stays in sync with the sources, carries the settings it was compiled with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from kfp.components import load_component_from_file

from preftune.components import COMPONENTS
from preftune.orchestration import cli, compilation
from preftune.pipelines import PIPELINES

ROOT = compilation.source_root()


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_committed_component_yaml_loads_back(name: str) -> None:
    component = load_component_from_file(str(ROOT / "components" / name / "component.yaml"))
    python_inputs = set(COMPONENTS[name].component_spec.inputs or {})
    assert set(component.component_spec.inputs or {}) == python_inputs
    assert component.component_spec.description


def test_committed_pipeline_yaml_loads_back() -> None:
    path = ROOT / "pipelines" / "dpo.yaml"
    pipeline = load_component_from_file(str(path))
    assert set(pipeline.component_spec.inputs) == set(PIPELINES["dpo"].component_spec.inputs)
    # the Kubeflow UI shows these descriptions next to each run parameter
    params = next(yaml.safe_load_all(path.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in params.values())


def test_committed_yaml_is_up_to_date() -> None:
    assert compilation.stale() == []


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(ROOT / "components", root / "components")
    shutil.copytree(ROOT / "pipelines", root / "pipelines")
    return root


def test_check_catches_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_tree(tmp_path)
    assert cli.main(["compile", "--check", "--root", str(root)]) == 0
    target = root / "components" / "dpo" / "component.yaml"
    target.write_text(target.read_text().replace("0.1", "0.2", 1))
    assert cli.main(["compile", "--check", "--root", str(root)]) == 1
    assert "stale" in capsys.readouterr().err
    target.unlink()
    assert compilation.stale(root) == [target]


def test_sdk_version_alone_does_not_make_a_file_stale(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    target = root / "pipelines" / "dpo.yaml"
    text = target.read_text()
    assert "sdkVersion: kfp-" in text
    target.write_text(text.replace("sdkVersion: kfp-", "sdkVersion: kfp-0.0.0-old-"))
    assert compilation.stale(root) == []


def test_training_steps_request_the_accelerator() -> None:
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "dpo.yaml").read_text()))
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-sft", "exec-dpo", "exec-evaluate"):
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert str(accelerator["resourceCount"]) == "1"
    assert "accelerator" not in executors["exec-ingest"]["container"]["resources"]


def test_every_component_uses_the_runtime_image_without_installing_kfp() -> None:
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "dpo.yaml").read_text()))
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"].startswith("ghcr.io/preftune/preftune:")
        assert "pip install" not in " ".join(container["command"])


@pytest.mark.parametrize(
    "image",
    [
        "registry.example.com/preftune:0.1.0",
        "registry.example.com:5000/team/preftune@sha256:" + "ab" * 32,
        "registry.example.com/preftune:0.1.0@sha256:" + "ab" * 32,
        "localhost/preftune:0.1.0-cpu",
    ],
)
def test_image_references_by_tag_or_digest(image: str) -> None:
    from preftune.launch import platform

    assert platform.check_image(image) == image


@pytest.mark.parametrize("image", ["preftune", "Registry/Preftune:1", "preftune@sha256:abc", "preftune:"])
def test_bad_image_references_are_refused(image: str) -> None:
    from preftune.launch import platform

    with pytest.raises(platform.SettingError, match="REPOSITORY"):
        platform.check_image(image)


@pytest.mark.parametrize("pipeline", ["dpo", "rlhf"])
def test_every_evaluate_step_gets_the_held_out_judge_parameter(pipeline: str) -> None:
    """The reward-hacking guard reaches evaluation in every method's branch, not only the default one."""
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / f"{pipeline}.yaml").read_text()))
    wired = [
        task["inputs"]["parameters"].get("heldout_judge_uri")
        for component in spec["components"].values()
        for name, task in component.get("dag", {}).get("tasks", {}).items()
        if task["componentRef"]["name"].startswith("comp-evaluate")
    ]
    assert len(wired) == 3  # dpo / kto / online DPO, or ppo / grpo / rloo
    assert all(w == {"componentInputParameter": "pipelinechannel--heldout_judge_model"} for w in wired)
    assert spec["root"]["inputDefinitions"]["parameters"]["heldout_judge_model"]["defaultValue"] == ""
