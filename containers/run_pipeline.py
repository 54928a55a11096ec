"""Run a preftune pipeline on this machine with every step inside the runtime image (kfp.local's DockerRunner).

    python containers/run_pipeline.py dpo --image localhost/preftune:0.1.0-cpu --pipeline-root runs/containers \\
        --param base_model=s3://bucket/models/tiny-llama --param sft_data=s3://bucket/data/sft.jsonl ...

The pipeline is compiled with ``--image`` (as ``preftune compile --image`` would), and kfp.local runs each step
as a container of that image through the docker SDK, which talks to podman's Docker-compatible API (started
here on a private socket unless ``DOCKER_HOST`` is set). The containers use the host network, so an S3
endpoint on 127.0.0.1 (``AWS_ENDPOINT_URL``) is reached as it is from here; the object-store and hub
variables of this environment are passed on. Local paths in parameters are paths inside the image (its
working directory holds ``examples/``); the pipeline root is mounted at the same path.

It writes ``summary.json`` in the run directory, with the steps in the same shape as ``preftune run``'s, and
prints each step's status. Exit status 0 when every step succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image import IMAGE, podman_service  # noqa: E402 - containers/image.py beside this script

#: Variables of this environment every step container gets when they are set here.
PASSED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "OMP_NUM_THREADS",
)


def _plain(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A task's outputs as JSON: artifacts (URI, type, metadata) apart from parameter values."""
    from kfp import dsl

    artifacts: dict[str, dict[str, Any]] = {}
    parameters: dict[str, Any] = {}
    for name, value in (outputs or {}).items():
        if isinstance(value, list) and value and all(isinstance(v, dsl.Artifact) for v in value):
            value = value[0]
        if isinstance(value, dsl.Artifact):
            artifacts[name] = {"uri": value.uri, "type": value.schema_title, "metadata": dict(value.metadata)}
        else:
            parameters[name] = value
    return {"artifacts": artifacts, "parameters": parameters}


@contextlib.contextmanager
def recorded_tasks() -> Iterator[dict[str, dict[str, Any]]]:
    """Each task's status, time and outputs as kfp.local runs it (its task executor, wrapped for the run)."""
    from kfp.local import status
    from kfp.local.orchestrator import task_executor

    from preftune.orchestration.run_summary import FAILED, SUCCEEDED

    original = task_executor.execute_single_task
    records: dict[str, dict[str, Any]] = {}

    def execute(*, task_name: str, **kwargs: Any) -> Any:
        start = time.monotonic()
        outputs, result = original(task_name=task_name, **kwargs)
        ok = result == status.Status.SUCCESS
        records[task_name] = {
            "status": SUCCEEDED if ok else FAILED,
            "seconds": round(time.monotonic() - start, 1),
            "attempts": 1,
            **_plain(outputs),
        }
        return outputs, result

    task_executor.execute_single_task = execute
    try:
        yield records
    finally:
        task_executor.execute_single_task = original


def run_container(client: Any, image: str, command: list[str], volumes: dict, **run_args: Any) -> int:
    """One step's container: its output streamed here, its exit status returned, then it is removed.

    Replaces kfp.local's own, which starts containers with auto-remove and takes a container gone before its
    status was read for a success: podman removes such a container as soon as it exits (and its API answers
    500, not 404, in the middle of that), so a quick step would fail the run, or a failed one pass.
    """
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"image {image} not found: build it with `make image`") from None
    run_args.pop("auto_remove", None)
    container = client.containers.run(
        image=image, command=command, volumes=volumes, detach=True, stdout=True, stderr=True, **run_args
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            print(chunk.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


@contextlib.contextmanager
def own_container_runs() -> Iterator[None]:
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def container_env() -> dict[str, str]:
    return {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}


def run(pipeline_name: str, image: str, root: Path, assignments: Sequence[str]) -> dict[str, Any]:
    """Run the pipeline in containers of ``image`` under ``root``; returns the summary (also in summary.json)."""
    os.environ["PREFTUNE_IMAGE"] = image  # read when the components are defined, as `preftune compile` does
    from google.protobuf import json_format
    from kfp import local

    from preftune.orchestration.parameters import parse_assignments
    from preftune.orchestration.run_summary import overall_status, spec_tasks, task_steps
    from preftune.pipelines import PIPELINES

    pipeline = PIPELINES[pipeline_name]
    overrides = parse_assignments(pipeline, list(assignments))
    arguments = {
        name: overrides.get(name, spec.default) for name, spec in pipeline.component_spec.inputs.items()
    }
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o1777)  # the steps run as the image's non-root user and write their outputs here
    before = set(os.listdir(root))
    runner = local.DockerRunner(network_mode="host", environment=container_env())
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=False)
    start = time.monotonic()
    with recorded_tasks() as records, own_container_runs():
        pipeline(**arguments)
    seconds = time.monotonic() - start
    (run_dir,) = [root / n for n in set(os.listdir(root)) - before if n.startswith(pipeline.name)]
    steps = task_steps(spec_tasks(json_format.MessageToDict(pipeline.pipeline_spec)), records)
    summary = {
        "pipeline": pipeline.name,
        "run_id": run_dir.name,
        "status": overall_status(steps, False),
        "run_dir": str(run_dir),
        "runner": "docker",
        "image": image,
        "duration_seconds": round(seconds, 1),
        "parameters": arguments,
        "steps": steps,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python containers/run_pipeline.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("pipeline", help="dpo, rlhf or compare")
    parser.add_argument(
        "--image", default=IMAGE, help=f"the runtime image (default {IMAGE}; `make image` builds it)"
    )
    parser.add_argument(
        "--pipeline-root", default="runs/containers", help="directory of the runs (default ./runs/containers)"
    )
    parser.add_argument(
        "--param", "-p", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter"
    )
    args = parser.parse_args(argv)
    root = Path(args.pipeline_root).resolve()
    with contextlib.ExitStack() as stack:
        if not os.environ.get("DOCKER_HOST"):
            socket_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="preftune-podman-")))
            os.environ["DOCKER_HOST"] = stack.enter_context(podman_service(socket_dir))
        summary = run(args.pipeline, args.image, root, args.param)
    for name, step in summary["steps"].items():
        print(f"  {step['status']:<9} {name} ({step['display_name']})")
    print(f"{summary['pipeline']}: {summary['status']} in {summary['duration_seconds']:.0f}s")
    print(f"summary: {Path(summary['run_dir']) / 'summary.json'}")
    return 0 if summary["status"] == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
