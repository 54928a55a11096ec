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

from preftune.config.components import SURFACES

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
        written.append(path)
    for text, path in readme_targets(root):
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for path in written:
        log(f"wrote {path}")
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
    for text, path in readme_targets(root):
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(path)
    return out


_EXAMPLES = {
    "champion": """current = champion_op(registry_uri="s3://my-bucket/registry", model_name="assistant")
current.output  # "" before the first promotion""",
    "gate": """verdict = gate_op(evaluation=evaluation.outputs["metrics"], max_kl=10.0)
with dsl.If(verdict.outputs["Output"] == True):  # noqa: E712
    promote_op(candidate=policy.outputs["model"], decision=verdict.outputs["decision"], ...)""",
    "promote": """promote_op(
    candidate=policy.outputs["model"],
    registry_uri="s3://my-bucket/registry",
    model_name="assistant",
    decision=verdict.outputs["decision"],
)""",
    "collect": """collect_op(
    model=policy.outputs["model"],
    prompts="s3://my-bucket/prompts.jsonl",
    out_uri="s3://my-bucket/labeling",
    k=4,
)""",
    "fingerprint": """fp = fingerprint_op(source="s3://my-bucket/sft/")
fp.set_caching_options(False)
ingest_op(source="s3://my-bucket/sft/", source_fingerprint=fp.output)""",
    "reward_model": """reward = reward_model_op(
    sft_model=sft.outputs["model"],
    train_pairs=pairs.outputs["train_pairs"],
    eval_pairs=pairs.outputs["eval_pairs"],
)""",
    "ppo": """policy = ppo_op(
    sft_model=sft.outputs["model"],
    reward_model=reward.outputs["model"],
    prompts=pairs.outputs["train_pairs"],
    kl_coef=0.05,
)""",
    "grpo": """policy = grpo_op(
    sft_model=sft.outputs["model"],
    reward_model=reward.outputs["model"],
    prompts=pairs.outputs["train_pairs"],
    estimator="rloo",  # or grpo, dr_grpo
    num_generations=4,
)""",
    "kto": """policy = kto_op(
    sft_model=sft.outputs["model"],
    train_pairs=pairs.outputs["train_pairs"],
    eval_pairs=pairs.outputs["eval_pairs"],
    train_unpaired=pairs.outputs["train_unpaired"],
    desirable_weight=1.0,
)""",
    "online_dpo": """policy = online_dpo_op(
    sft_model=sft.outputs["model"],
    reward_model=reward.outputs["model"],
    prompts=pairs.outputs["train_pairs"],
    rounds=8,
    num_generations=4,
)""",
    "ingest": """sft_rows = ingest_op(source="s3://my-bucket/sft/")
sft_rows.outputs["train_data"]  # -> sft_op(train_data=...)""",
    "preference_import": """pairs = preference_import_op(source="s3://my-bucket/feedback/")
pairs.outputs["train_pairs"], pairs.outputs["eval_pairs"]  # -> dpo_op / reward model""",
    "sft": """sft = sft_op(
    base_model="meta-llama/Llama-3.2-1B",
    train_data=sft_rows.outputs["train_data"],
    eval_data=sft_rows.outputs["eval_data"],
    use_lora=True,
)""",
    "dpo": """policy = dpo_op(
    sft_model=sft.outputs["model"],
    train_pairs=pairs.outputs["train_pairs"],
    eval_pairs=pairs.outputs["eval_pairs"],
    beta=0.1,
    loss_type="sigmoid",
)""",
    "evaluate": """evaluate_op(
    candidate=policy.outputs["model"],
    reference=sft.outputs["model"],
    eval_prompts="s3://my-bucket/eval_prompts.jsonl",
    eval_pairs=pairs.outputs["eval_pairs"],
)""",
    "compare": """compare_op(  # any two or more methods; leave the others out
    sft_metrics=sft.outputs["metrics"],
    dpo_metrics=dpo.outputs["metrics"],
    kto_metrics=kto.outputs["metrics"],
    dpo_evaluation=dpo_eval.outputs["metrics"],
    kto_evaluation=kto_eval.outputs["metrics"],
    dpo_generations=dpo_eval.outputs["generations"],
    kto_generations=kto_eval.outputs["generations"],
    dpo_frontier=dpo_eval.outputs["frontier"],
    kto_frontier=kto_eval.outputs["frontier"],
)""",
    "choose_methods": """chosen = choose_methods_op(methods="dpo,grpo,kto")
with dsl.If(chosen.outputs["grpo"] == True):  # noqa: E712
    grpo_op(...)""",
    "refuse_choice": """with dsl.If(policy_optimizer == "ppo"):
    ppo_op(...)
with dsl.Elif(policy_optimizer == "grpo"):
    grpo_op(...)
with dsl.Else():  # a misspelt value fails the run instead of training nothing
    refuse_choice_op(parameter="policy_optimizer", value=policy_optimizer, allowed="ppo,grpo")""",
    "skip_method": """with dsl.If(chosen.outputs["kto"] == True):  # noqa: E712
    kto_eval = evaluate_op(...)
with dsl.Else():
    skipped = skip_method_op(method="kto")
compare_op(..., kto_evaluation=dsl.OneOf(kto_eval.outputs["metrics"], skipped.outputs["evaluation"]))""",
}


def _type_name(spec: Any) -> str:
    return str(spec.type).removeprefix("system.").split("@")[0]


def _paragraphs(text: str) -> str:
    """KFP's description (docstring summary and body) as Markdown paragraphs, one line each."""
    return "\n\n".join(" ".join(block.split()) for block in text.split("\n\n") if block.strip())


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _input_rows(name: str, spec: Any) -> list[str]:
    """One row per input: a parameter that sets a config field takes its default, meaning and allowed values
    from the field's metadata, any other input its default and description as KFP parsed them."""
    surface = SURFACES.get(name)
    rows = []
    for io_name, io in (spec.inputs or {}).items():
        default = "" if io.default is None else f"`{io.default!r}`"
        meaning, accepts = io.description or "", ""
        if surface is not None and surface.fields_of(io_name):
            (_, field), *_ = surface.fields_of(io_name)
            default = f"`{field.default!r}`"
            meaning, accepts = surface.describe(io_name), surface.allowed(io_name)
        rows.append(f"| `{io_name}` | {_type_name(io)} | {default} | {_cell(accepts)} | {_cell(meaning)} |")
    return rows


def render_readme(name: str, component: Any) -> str:
    """A component's README: what it does and its inputs and outputs (KFP's descriptions of the docstring, and
    the config metadata for the parameters that set config fields), and an example."""
    spec = component.component_spec
    short, _, long = (spec.description or "").partition("\n")
    about = "\n\n".join(text for text in (_paragraphs(short), _paragraphs(long)) if text)
    outputs = [
        f"| `{io_name}` | {_type_name(io)} | {_cell(io.description or '')} |"
        for io_name, io in (spec.outputs or {}).items()
    ]
    op = f"{name}_op"
    return f"""# `{name}` component

{about}

<!-- Generated by `preftune compile` from components/{name}/component.py and the config metadata in
src/preftune/config/; edit those, not this file. -->

## Inputs

| name | type | default | allowed | meaning |
|---|---|---|---|---|
{chr(10).join(_input_rows(name, spec))}

## Outputs

| name | type | meaning |
|---|---|---|
{chr(10).join(outputs)}

## Use it in your pipeline

From Python (`pip install preftune`):

```python
from kfp import dsl
from preftune.components import {op}

{_EXAMPLES[name]}
```

From the compiled file, with no preftune install:

```python
from kfp import components

{op} = components.load_component_from_file("components/{name}/component.yaml")
```

The library function it calls is tested on its own in `tests/`, and the component itself runs through
`kfp.local` in `tests/test_components_local.py`.
"""


def readme_targets(root: Path | None = None) -> list[tuple[str, Path]]:
    """Every component README with the text it should hold."""
    from preftune.components import COMPONENTS

    root = root or source_root()
    return [
        (render_readme(name, component), root / "components" / name / "README.md")
        for name, component in COMPONENTS.items()
    ]
