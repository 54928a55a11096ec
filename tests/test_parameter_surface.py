"""One parameter surface: each config field's metadata (help, default, allowed values) is what the components
expose, what `preftune run` refuses, what each step's validate refuses, and what the component READMEs show."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from pathlib import Path

import pytest

from preftune.components import COMPONENTS
from preftune.config.components import SURFACES, VALIDATORS, configs_from, description, documented
from preftune.config.dpo import DPOConfig
from preftune.config.fields import Bounds, ConfigError, allowed, bounds_of, choices_of
from preftune.config.ppo import PPOConfig
from preftune.config.reward import RewardConfig
from preftune.config.sft import SFTConfig
from preftune.orchestration.bindings import TaskBinding, task_bindings
from preftune.orchestration.parameters import ParameterError, parse_assignments
from preftune.pipelines import PIPELINES

ROOT = Path(__file__).resolve().parents[1]

#: Component parameters with a default that are not config fields, and why.
NOT_CONFIG = {
    "evaluate": {"judge", "heldout_judge", "checkpoints", "judge_uri", "heldout_judge_uri", "champion_uri"},
    "gate": {"champion_uri"},  # the champion step's output
    "ingest": {"source_fingerprint"},  # only a cache key
    "preference_import": {"source_fingerprint"},
    "grpo": {"reward_model"},  # optional input artifacts (None when not given)
    "online_dpo": {"reward_model"},
    "kto": {"train_unpaired"},
}


# ------------------------------------------------------------------------------------------ components = configs


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_component_parameters_are_config_fields_with_the_same_type_and_default(name: str) -> None:
    surface = SURFACES[name]
    parameters = inspect.signature(COMPONENTS[name].python_func).parameters
    hints = {cls: typing.get_type_hints(cls) for cls in surface.configs}
    exposed = set()
    for pname, parameter in parameters.items():
        fields = surface.fields_of(pname)
        if not fields:
            assert parameter.default is inspect.Parameter.empty or pname in NOT_CONFIG.get(name, ()), (
                f"{name}: parameter {pname!r} has a default but sets no config field"
            )
            continue
        exposed.add(pname)
        for cls, field in fields:
            assert parameter.annotation is hints[cls][field.name], (
                f"{name}.{pname}: type differs from {cls.__name__}"
            )
            assert parameter.default == field.default, (
                f"{name}.{pname} defaults to {parameter.default!r}, {cls.__name__}.{field.name} to {field.default!r}"
            )
    assert exposed, f"{name} exposes no config field"
    for link in surface.links.values():
        assert link.parameter in parameters, (
            f"{name}: link from a parameter it does not have ({link.parameter})"
        )


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_component_descriptions_are_generated_from_the_field_help(name: str) -> None:
    spec = COMPONENTS[name].component_spec
    surface = SURFACES[name]
    for pname, io in spec.inputs.items():
        if not surface.fields_of(pname):
            continue
        (_, field), *_ = surface.fields_of(pname)
        assert io.description == description(name, pname)
        assert io.description.startswith(field.metadata["help"])
        if allowed(field):
            assert io.description.endswith(f"Allowed: {allowed(field)}.")


def test_one_default_for_checkpoint_every_and_lora_alpha_is_a_parameter() -> None:
    for cls, component in ((SFTConfig, "sft"), (RewardConfig, "reward_model"), (DPOConfig, "dpo")):
        default = inspect.signature(COMPONENTS[component].python_func).parameters["checkpoint_every"].default
        assert cls().checkpoint_every == default == 100
    ppo_default = inspect.signature(COMPONENTS["ppo"].python_func).parameters["checkpoint_every"].default
    assert PPOConfig().checkpoint_every == ppo_default == 4  # PPO counts iterations, not optimisation steps
    for component in ("sft", "reward_model", "dpo", "ppo"):
        assert "lora_alpha" in COMPONENTS[component].component_spec.inputs
    for name, pipeline in PIPELINES.items():
        assert "lora_alpha" in pipeline.component_spec.inputs, name


def _launcher() -> object:
    """The module defining launch.distributed.Scale, with the stage table and the strategies beside it."""
    from preftune.launch.distributed import Scale

    return importlib.import_module(Scale.__module__)


def test_batch_sizes_mean_the_same_thing_everywhere() -> None:
    """The launcher splits these fields among the workers, so every help says they are summed over them."""
    for stage in _launcher().STAGES.values():
        config = next(c for c in VALIDATORS if c.__name__ == stage.config_class)
        fields = {f.name: f for f in dataclasses.fields(config)}
        for name in (*stage.split_batches, *stage.divisible):
            assert "summed over all worker processes" in fields[name].metadata["help"], (config, name)
    for pipeline in PIPELINES.values():
        for pname in ("sft_batch_size", "dpo_batch_size"):
            if pname in pipeline.component_spec.inputs:
                assert "summed over all worker processes" in pipeline.component_spec.inputs[pname].description


def test_data_and_gate_configs_are_the_library_keyword_arguments() -> None:
    """The components pass ``**asdict(config)``: the names must be the functions' keyword arguments."""
    from preftune.config.gate import GateConfig
    from preftune.config.ingest import IngestConfig
    from preftune.config.preference_import import FORMAT_CHOICES, RANKED_PAIRS_CHOICES, PreferenceImportConfig
    from preftune.data import formats, pairing
    from preftune.data.ingest import ingest
    from preftune.data.preferences import import_preferences
    from preftune.eval.gate import decide, run_gate

    for config, function, same_defaults in (
        (IngestConfig, ingest, True),
        (PreferenceImportConfig, import_preferences, True),
        (GateConfig, decide, False),  # decide's length_controlled defaults to off; the step's to on
        (GateConfig, run_gate, False),
    ):
        keywords = {
            n: p.default
            for n, p in inspect.signature(function).parameters.items()
            if p.kind is p.KEYWORD_ONLY
        }
        for field in dataclasses.fields(config):
            assert field.name in keywords, (config.__name__, field.name, function.__name__)
            if same_defaults:
                assert keywords[field.name] == field.default, (config.__name__, field.name)
    assert (*FORMAT_CHOICES,) == ("auto", *formats.FORMATS)
    assert (*RANKED_PAIRS_CHOICES,) == pairing.RANKED_MODES


def test_the_scale_choices_are_the_launchers() -> None:
    from preftune.config.scale import STRATEGIES, ScaleConfig

    assert _launcher().STRATEGIES == STRATEGIES
    assert set(ScaleConfig().launch_arguments()) <= {f.name for f in dataclasses.fields(_launcher().Scale)}


# ------------------------------------------------------------------------------ ranges: run and validate agree


def _edges(bounds: Bounds | None, whole: bool) -> list[float]:
    """Values on both sides of each bound: the nearest outside, and the bound (or nearest inside) itself."""
    values: list[float] = []
    for bound, inclusive, outward in (
        (bounds.low if bounds else None, bounds.low_inclusive if bounds else True, -math.inf),
        (bounds.high if bounds else None, bounds.high_inclusive if bounds else True, math.inf),
    ):
        if bound is None:
            continue
        step = (1 if outward > 0 else -1) if whole else None
        outside = bound + step if whole else math.nextafter(bound, outward)
        inside = bound if inclusive else (bound - step if whole else math.nextafter(bound, -outward))
        values += [outside if inclusive else bound, inside]
    return values


def _cases(pipeline: object) -> list[tuple[str, object]]:
    """(pipeline parameter, value) pairs around every bound and choice of the config fields it sets, plus NaN
    and infinity for numbers."""
    cases = []
    for binding in task_bindings(pipeline):
        surface = SURFACES.get(binding.component)
        for name, (kind, origin) in binding.sources.items() if surface else ():
            for _, field in surface.fields_of(name) if kind == "parameter" else ():
                whole = isinstance(field.default, int) and not isinstance(field.default, bool)
                if choices_of(field):
                    values: list[object] = ["no-such-choice", *choices_of(field)]
                elif isinstance(field.default, float):
                    values = [math.nan, math.inf, -math.inf, *_edges(bounds_of(field), whole=False)]
                else:
                    values = _edges(bounds_of(field), whole=whole)
                cases += [(origin, v) for v in values]
    return list(dict.fromkeys(cases))


def _admitted(binding: TaskBinding, parameter: str, value: object) -> bool:
    """Whether every field of this task that the parameter sets accepts the value, by its metadata alone."""
    surface = SURFACES[binding.component]
    for name, (kind, origin) in binding.sources.items():
        if kind != "parameter" or origin != parameter:
            continue
        for _, field in surface.fields_of(name):
            if choices_of(field) and value not in choices_of(field):
                return False
            if isinstance(value, float) and not math.isfinite(value):
                return False
            bounds = bounds_of(field)
            if bounds is not None and not isinstance(value, str) and not bounds.admits(value):
                return False
    return True


def _stage_refuses(binding: TaskBinding, defaults: dict, parameter: str, value: object) -> bool:
    try:
        configs_from(binding.component, binding.arguments({**defaults, parameter: value}))
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_run_and_the_steps_refuse_the_same_values(name: str) -> None:
    """Just outside a range (and NaN, infinity, an unknown choice): refused by `preftune run` and by the step's
    own validate. At the edge: accepted by both."""
    pipeline = PIPELINES[name]
    defaults = {n: spec.default for n, spec in pipeline.component_spec.inputs.items()}
    bindings = [b for b in task_bindings(pipeline) if b.component in SURFACES]
    cases = _cases(pipeline)
    assert len(cases) > 80
    for parameter, value in cases:
        feeding = [b for b in bindings if any(s == ("parameter", parameter) for s in b.sources.values())]
        expected_ok = all(_admitted(b, parameter, value) for b in feeding)
        for binding in feeding:
            refused = _stage_refuses(binding, defaults, parameter, value)
            assert refused != _admitted(binding, parameter, value), (name, binding.task, parameter, value)
        assignment = f"{parameter}={value if isinstance(value, str) else repr(value)}"
        if expected_ok:
            assert parse_assignments(pipeline, [assignment]) == {parameter: value}
            continue
        with pytest.raises(ParameterError, match=rf"parameter '{parameter}': \w+Config\.\w+ must be"):
            parse_assignments(pipeline, [assignment])


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_stage_field_a_pipeline_sets_has_a_range_or_choices_or_is_free(name: str) -> None:
    """A numeric pipeline parameter that sets a config field shows what it accepts in `preftune run --help`."""
    from preftune.orchestration.parameters import pipeline_parameters

    for parameter in pipeline_parameters(PIPELINES[name]).values():
        if parameter.type in ("int", "float"):
            fed = any(
                ("parameter", parameter.name) in b.sources.values()
                for b in task_bindings(PIPELINES[name])
                if b.component in SURFACES
            )
            if fed:
                assert parameter.allowed, parameter.name


def test_label_smoothing_of_one_half_is_refused_before_and_inside_the_step() -> None:
    """The CLI used to accept it; the config then refused it once the step had started."""
    with pytest.raises(
        ParameterError, match=r"'dpo_label_smoothing': DPOConfig.label_smoothing must be in \[0, 0.5\)"
    ):
        parse_assignments(PIPELINES["dpo"], ["dpo_label_smoothing=0.5"])
    with pytest.raises(ConfigError, match=r"DPOConfig.label_smoothing must be in \[0, 0.5\), got 0.5"):
        VALIDATORS[DPOConfig](DPOConfig(label_smoothing=0.5))
    assert parse_assignments(PIPELINES["dpo"], ["dpo_label_smoothing=0.49"]) == {"dpo_label_smoothing": 0.49}


@pytest.mark.parametrize(
    ("name", "parameter"), [(n, "checkpoint_every") for n in PIPELINES] + [("rlhf", "ppo_checkpoint_every")]
)
def test_checkpoint_every_is_refused_below_zero_and_zero_turns_it_off(name: str, parameter: str) -> None:
    with pytest.raises(
        ParameterError, match=rf"'{parameter}': \w+Config.checkpoint_every must be >= 0, got -1"
    ):
        parse_assignments(PIPELINES[name], [f"{parameter}=-1"])
    assert parse_assignments(PIPELINES[name], [f"{parameter}=0"]) == {parameter: 0}


def test_a_parameter_feeding_several_steps_is_checked_in_each() -> None:
    """dpo_beta sets DPO's beta and the evaluation's: both are built and checked."""
    (dpo_task,) = [b for b in task_bindings(PIPELINES["dpo"]) if b.component == "dpo"]
    evals = [b for b in task_bindings(PIPELINES["dpo"]) if b.component == "evaluate"]  # one per dpo_method
    assert len(evals) == 3 and dpo_task.sources["beta"] == ("parameter", "dpo_beta")
    assert all(e.sources["beta"] == ("parameter", "dpo_beta") for e in evals)
    # one evaluation per method of the compare pipeline
    evaluations = [b for b in task_bindings(PIPELINES["compare"]) if b.component == "evaluate"]
    assert len(evaluations) == 6 and all(
        b.sources["max_prompts"] == ("parameter", "eval_max_prompts") for b in evaluations
    )


# --------------------------------------------------------------------------------------- READMEs = metadata


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_readme_tables_show_each_fields_default_allowed_values_and_help(name: str) -> None:
    readme = (ROOT / "components" / name / "README.md").read_text(encoding="utf-8")
    surface = SURFACES[name]
    for pname in COMPONENTS[name].component_spec.inputs:
        for cls, field in surface.fields_of(pname)[:1]:
            kind = {int: "Integer", float: "Float", str: "String", bool: "Boolean"}[type(field.default)]
            meaning = surface.describe(pname).replace("|", "\\|")
            row = f"| `{pname}` | {kind} | `{field.default!r}` | {surface.allowed(pname)} | {meaning} |"
            assert row in readme, (
                f"{name}/README.md: the row of {pname} does not match {cls.__name__}.{field.name}"
            )


def test_bindings_follow_conditions_up_to_the_pipeline_parameters_and_keep_constant_types() -> None:
    # inside three dsl.If: the dpo_method branch, the gate's and the registry's
    promote, *others = [b for b in task_bindings(PIPELINES["dpo"]) if b.component == "promote"]
    assert len(others) == 2 and all(p.sources == promote.sources for p in others)
    assert promote.sources["registry_uri"] == ("parameter", "registry_uri")
    assert promote.sources["model_name"] == ("parameter", "model_name")
    assert promote.sources["run_id"][0] == "constant"
    (compare,) = [b for b in task_bindings(PIPELINES["compare"]) if b.component == "compare"]
    kind, value = compare.sources["gpus_per_step"]
    assert kind == "constant" and type(value) is int
    assert compare.arguments({"num_nodes": 3})["num_nodes"] == 3


def test_config_parameters_are_documented_from_the_metadata_only() -> None:
    def by_hand(beta: float = 0.1) -> None:
        """Do it.

        Args:
            beta: Written by hand.
        """

    with pytest.raises(ValueError, match="beta come from the config metadata"):
        documented("dpo")(by_hand)

    def bare(beta: float = 0.1) -> None:
        """Do it."""

    assert documented("dpo")(bare).__doc__ == f"Do it.\n\nArgs:\n    beta: {description('dpo', 'beta')}"


# ------------------------------------------------------------------------------ learning rates by use_lora


def test_ppo_and_online_dpo_learning_rates_default_to_a_tenth_with_full_weights() -> None:
    from preftune.config.grpo import GRPOConfig
    from preftune.config.kto import KTOConfig
    from preftune.config.online_dpo import OnlineDPOConfig
    from preftune.config.shared import learning_rate_of

    ppo = PPOConfig(use_lora=False)
    assert learning_rate_of(ppo) == pytest.approx(1e-4)
    assert learning_rate_of(ppo, "critic_learning_rate") == pytest.approx(1e-4)
    assert learning_rate_of(PPOConfig()) == learning_rate_of(PPOConfig(), "critic_learning_rate") == 1e-3
    assert learning_rate_of(PPOConfig(use_lora=False, learning_rate=3e-4)) == 3e-4  # a value set is kept
    # online DPO with full weights passed its KL stop at LoRA's rate on the alignment benchmark
    assert learning_rate_of(OnlineDPOConfig(use_lora=False)) == pytest.approx(5e-5)
    assert learning_rate_of(OnlineDPOConfig()) == pytest.approx(5e-4)
    # the other methods keep one rate: a tenth of it barely moved them on the alignment benchmark
    for cls in (DPOConfig, GRPOConfig, KTOConfig, SFTConfig):
        assert learning_rate_of(cls(use_lora=False)) == cls().learning_rate > 0, cls


@pytest.mark.parametrize("value", [0.0, -0.5, -2.0])
def test_a_learning_rate_other_than_positive_or_minus_one_is_refused(value: float) -> None:
    with pytest.raises(ParameterError, match=r"'ppo_learning_rate'.*must be > 0, or -1 \(by use_lora\)"):
        parse_assignments(PIPELINES["rlhf"], [f"ppo_learning_rate={value}"])
    assert parse_assignments(PIPELINES["rlhf"], ["ppo_learning_rate=-1"]) == {"ppo_learning_rate": -1.0}
