"""Start runs and recurring runs of preftune's compiled pipelines on a Kubeflow Pipelines server.

``preftune submit`` uploads the compiled pipeline (a new version of it when a pipeline of that name exists, so
the UI keeps one pipeline with its history) and starts a run; ``preftune schedule`` does the same upload and
creates a recurring run (a nightly retrain): 6-field cron, no catch-up of missed runs, at most one run at a time.
A recurring run is found by its name in its experiment and replaced, so scheduling again (a redeploy) leaves one.
Both take ``--pipeline-root`` (``s3://``, ``minio://`` or ``gs://``): where this run's artifacts go, instead of
the namespace's ``kfp-launcher`` default.

Authentication, first match wins: a bearer token from the environment variable named by ``--token-env`` (default
``KF_PIPELINES_TOKEN``); inside a pod, the projected ServiceAccount token KFP mounts at
``/var/run/secrets/kubeflow/pipelines/token`` (``KF_PIPELINES_SA_TOKEN_PATH``); otherwise nothing, which suits a
port-forwarded ``ml-pipeline-ui`` / ``ml-pipeline`` service. Tokens are never printed or written anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_TOKEN_ENV = "KF_PIPELINES_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
#: Object stores a KFP pipeline root may be in (the launcher's providers).
PIPELINE_ROOT_SCHEMES = ("s3", "minio", "gs")
#: Pages of recurring runs read when looking for one by name (100 each).
MAX_PAGES = 50


class SubmitError(ValueError):
    """A submit / schedule request that cannot be made as given (bad cron, missing pipeline file, ...)."""


def check_cron(cron: str) -> str:
    """KFP's cron has 6 fields, seconds first (``0 0 2 * * *`` = 02:00 daily); a 5-field crontab line would
    silently mean something else, so it is refused with the fix."""
    fields = cron.split()
    if len(fields) != len(CRON_FIELDS):
        hint = f"; did you mean '0 {cron.strip()}'?" if len(fields) == 5 else ""
        raise SubmitError(
            f"cron {cron!r} has {len(fields)} fields; Kubeflow Pipelines expects 6: "
            f"{' '.join(CRON_FIELDS)} (for example '0 0 2 * * *' = every day at 02:00){hint}"
        )
    return " ".join(fields)


def check_pipeline_root(root: str | None) -> str | None:
    """A per-run pipeline root must be in an object store the KFP launcher writes to."""
    if root is None:
        return None
    scheme = root.split("://", 1)[0].lower() if "://" in root else ""
    if scheme not in PIPELINE_ROOT_SCHEMES or not root.split("://", 1)[1].strip("/"):
        raise SubmitError(
            f"pipeline root {root!r}: expected {', '.join(s + '://BUCKET[/PREFIX]' for s in PIPELINE_ROOT_SCHEMES)}"
        )
    return root


def pipeline_package(name: str) -> Path:
    """The committed compiled YAML of a preftune pipeline (``pipelines/<name>.yaml``)."""
    import preftune.pipelines

    path = Path(preftune.pipelines.__file__).resolve().parent / f"{name}.yaml"
    if not path.is_file():
        raise SubmitError(f"compiled pipeline {path} not found; run `preftune compile`")
    return path


def make_client(
    host: str,
    *,
    token_env: str = DEFAULT_TOKEN_ENV,
    namespace: str | None = None,
    ssl_ca_cert: str | None = None,
) -> Any:
    """A ``kfp.Client`` for ``host``, authenticated as the module docstring says."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    token = os.environ.get(token_env, "").strip() if token_env else ""
    credentials = None
    sa_path = os.environ.get(SA_TOKEN_PATH_ENV, DEFAULT_SA_TOKEN_PATH)
    if not token and Path(sa_path).is_file():
        credentials = ServiceAccountTokenVolumeCredentials(path=sa_path)
    kwargs: dict[str, Any] = {"host": host, "existing_token": token or None, "credentials": credentials}
    if namespace:
        kwargs["namespace"] = namespace
    if ssl_ca_cert:
        kwargs["ssl_ca_cert"] = ssl_ca_cert
    return kfp.Client(**kwargs)


@dataclass(frozen=True)
class Uploaded:
    """Where the compiled pipeline landed on the server."""

    pipeline_id: str
    version_id: str
    new_pipeline: bool


def _version_name(pipeline_name: str, package: Path) -> str:
    from preftune import __version__

    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:8]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{pipeline_name}-{__version__}-{stamp}-{digest}"


def upload(client: Any, package: Path, pipeline_name: str, description: str = "") -> Uploaded:
    """Upload ``package`` as pipeline ``pipeline_name``, or as a new version of it when it already exists."""
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name, description=description)
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
        found = versions.pipeline_versions or []
        if not found:
            raise SubmitError(
                f"pipeline {pipeline_name!r} was uploaded but the server lists no version of it"
            )
        return Uploaded(pipeline_id, found[0].pipeline_version_id, new_pipeline=True)
    version = client.upload_pipeline_version(
        str(package),
        pipeline_version_name=_version_name(pipeline_name, package),
        pipeline_id=pipeline_id,
        description=description,
    )
    return Uploaded(pipeline_id, version.pipeline_version_id, new_pipeline=False)


def _experiment_id(client: Any, name: str, namespace: str | None) -> str:
    experiment = client.create_experiment(name=name, namespace=namespace)  # returns the existing one by name
    return experiment.experiment_id


def submit(
    client: Any,
    package: Path,
    pipeline_name: str,
    parameters: dict[str, Any],
    *,
    experiment: str,
    run_name: str,
    namespace: str | None = None,
    service_account: str | None = None,
    description: str = "",
    pipeline_root: str | None = None,
) -> dict[str, Any]:
    """Upload the pipeline (or a new version) and start one run; returns ids for the caller to print."""
    uploaded = upload(client, package, pipeline_name, description)
    run = client.run_pipeline(
        experiment_id=_experiment_id(client, experiment, namespace),
        job_name=run_name,
        params=parameters,
        pipeline_id=uploaded.pipeline_id,
        version_id=uploaded.version_id,
        service_account=service_account,
        pipeline_root=check_pipeline_root(pipeline_root),
    )
    return {"run_id": run.run_id, **vars(uploaded)}


def schedule(
    client: Any,
    package: Path,
    pipeline_name: str,
    parameters: dict[str, Any],
    *,
    cron: str,
    experiment: str,
    name: str,
    namespace: str | None = None,
    service_account: str | None = None,
    description: str = "",
    pipeline_root: str | None = None,
) -> dict[str, Any]:
    """Upload the pipeline (or a new version) and create a recurring run: no catch-up, one run at a time.

    Recurring runs of the same name in the experiment are replaced: the new one is created first, then the old
    ones are deleted, so a failure never leaves the schedule without a recurring run.
    """
    cron = check_cron(cron)
    check_pipeline_root(pipeline_root)
    uploaded = upload(client, package, pipeline_name, description)
    experiment_id = _experiment_id(client, experiment, namespace)
    previous = recurring_runs_named(client, name, experiment_id)
    recurring = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        description=description or None,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=parameters,
        pipeline_id=uploaded.pipeline_id,
        version_id=uploaded.version_id,
        service_account=service_account,
        pipeline_root=pipeline_root,
    )
    for old in previous:
        client.delete_recurring_run(old)
    return {"recurring_run_id": recurring.recurring_run_id, "replaced": previous, **vars(uploaded)}


def recurring_runs_named(client: Any, name: str, experiment_id: str) -> list[str]:
    """Ids of the recurring runs called ``name`` in the experiment (the server filters; the name is checked)."""
    query = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "stringValue": name}]})
    found: list[str] = []
    token = ""
    for _ in range(MAX_PAGES):
        page = client.list_recurring_runs(
            page_token=token, page_size=100, experiment_id=experiment_id, filter=query
        )
        found += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found
    raise SubmitError(f"more than {MAX_PAGES * 100} recurring runs named {name!r}: clean them up first")


# ---------------------------------------------------------------------------------------------------------- CLI


#: The pipelines' names, written out so that `--help` needs no pipeline (importing them imports kfp);
#: tests/test_submit.py checks it against preftune.pipelines.PIPELINES.
PIPELINE_NAMES = ("compare", "dpo", "rlhf")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", choices=PIPELINE_NAMES, help="which pipeline")
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    parser.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a pipeline parameter (repeatable); `preftune run PIPELINE --help` lists them",
    )
    parser.add_argument("--experiment", default="preftune", help="experiment to file the run under")
    parser.add_argument("--namespace", help="Kubeflow profile namespace (multi-user Kubeflow)")
    parser.add_argument("--service-account", help="Kubernetes ServiceAccount the steps run as")
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        help=f"environment variable holding a bearer token (default: {DEFAULT_TOKEN_ENV}); in a pod the "
        "mounted ServiceAccount token is used when it is unset",
    )
    parser.add_argument("--ssl-ca-cert", help="CA bundle to verify the endpoint's TLS certificate")
    parser.add_argument(
        "--pipeline-root",
        help="where this run's artifacts go (s3://, minio:// or gs:// BUCKET/PREFIX), instead of the "
        "namespace's kfp-launcher default",
    )
    parser.add_argument("--package", help="compiled pipeline YAML to upload (default: the committed one)")
    parser.add_argument("--pipeline-name", help="name of the pipeline on the server (default: its own name)")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``preftune submit``."""
    _add_common(parser)
    parser.add_argument("--run-name", help="name of the run (default: <pipeline name> <UTC time>)")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``preftune schedule``."""
    _add_common(parser)
    parser.add_argument(
        "--cron",
        required=True,
        help="6-field cron, seconds first: '0 0 2 * * *' runs every day at 02:00 (server time zone, UTC by "
        "default)",
    )
    parser.add_argument("--name", help="name of the recurring run (default: <pipeline name> nightly)")


def _prepare(args: argparse.Namespace, command: str) -> tuple[Any, Path, str, dict[str, Any]] | int:
    from preftune.orchestration.parameters import ParameterError, parse_assignments
    from preftune.pipelines import PIPELINES

    pipeline = PIPELINES[args.pipeline]
    try:
        parameters = parse_assignments(pipeline, args.param)
        package = Path(args.package) if args.package else pipeline_package(args.pipeline)
        if not package.is_file():
            raise SubmitError(f"pipeline package {package} not found")
        if command == "schedule":
            check_cron(args.cron)
        check_pipeline_root(args.pipeline_root)
    except (ParameterError, SubmitError) as err:
        print(f"preftune {command}: error: {err}", file=sys.stderr)
        return 2
    client = make_client(
        args.host, token_env=args.token_env, namespace=args.namespace, ssl_ca_cert=args.ssl_ca_cert
    )
    return client, package, args.pipeline_name or pipeline.name, parameters


def _report_failure(command: str, err: Exception) -> int:
    print(f"preftune {command}: the Kubeflow Pipelines server refused the request: {err}", file=sys.stderr)
    return 1


def run_submit(args: argparse.Namespace) -> int:
    """``preftune submit``: upload the pipeline and start a run; prints the run id and its UI link."""
    prepared = _prepare(args, "submit")
    if isinstance(prepared, int):
        return prepared
    client, package, pipeline_name, parameters = prepared
    run_name = args.run_name or f"{pipeline_name} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}"
    try:
        result = submit(
            client,
            package,
            pipeline_name,
            parameters,
            experiment=args.experiment,
            run_name=run_name,
            namespace=args.namespace,
            service_account=args.service_account,
            pipeline_root=args.pipeline_root,
        )
    except Exception as err:  # an ApiException carries the server's message
        return _report_failure("submit", err)
    action = "uploaded pipeline" if result["new_pipeline"] else "uploaded a new version of pipeline"
    print(f"{action} {pipeline_name} ({result['pipeline_id']}, version {result['version_id']})")
    print(f"started run {run_name!r}: {result['run_id']}")
    print(f"  {args.host.rstrip('/')}/#/runs/details/{result['run_id']}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    """``preftune schedule``: upload the pipeline and create a recurring run; prints its id."""
    prepared = _prepare(args, "schedule")
    if isinstance(prepared, int):
        return prepared
    client, package, pipeline_name, parameters = prepared
    name = args.name or f"{pipeline_name} nightly"
    try:
        result = schedule(
            client,
            package,
            pipeline_name,
            parameters,
            cron=args.cron,
            experiment=args.experiment,
            name=name,
            namespace=args.namespace,
            service_account=args.service_account,
            pipeline_root=args.pipeline_root,
        )
    except Exception as err:
        return _report_failure("schedule", err)
    action = "uploaded pipeline" if result["new_pipeline"] else "uploaded a new version of pipeline"
    print(f"{action} {pipeline_name} ({result['pipeline_id']}, version {result['version_id']})")
    print(f"created recurring run {name!r} ({check_cron(args.cron)}, no catch-up, one run at a time):")
    print(f"  {result['recurring_run_id']}")
    for old in result["replaced"]:
        print(f"  replaced the earlier recurring run {old} of that name (deleted)")
    return 0
