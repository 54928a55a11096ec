"""The registry's two backends against real servers: MLflow's model registry (``mlflow server`` on 127.0.0.1,
SQLite, local artifact root) and S3 (moto); the same champion lookup and gate on both; and promotions racing
from several processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from atomic_s3_server import atomic_moto_server
from mlflow_server import mlflow_server
from s3_server import s3_bucket
from test_registry import FILES, GOOD, THRESHOLDS, make_candidate

from preftune.eval.gate import run_gate
from preftune.io import registry, storage
from preftune.io.registry import locations, mlflow_turns

WORKERS = 6


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow server for the module (a cold start takes ~20 s), stopped at its end."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def mlflow_uri(mlflow_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return "mlflow+" + mlflow_url


@pytest.fixture
def client(mlflow_url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)


@pytest.fixture(params=["local", "s3", "mlflow"])
def any_registry(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    if request.param == "s3":
        return request.getfixturevalue("s3").uri("registry")
    return request.getfixturevalue("mlflow_uri")


def _model(request: pytest.FixtureRequest) -> str:
    """A registered-model name of its own for each test: they share one MLflow server."""
    return "m-" + str(abs(hash(request.node.nodeid)))[:12]


def _files_match_manifest(uri: str, tmp_path: Path) -> dict[str, bytes]:
    """Download a version and check every file against its manifest; returns the files."""
    dest = storage.download(uri, tmp_path / f"check-{abs(hash(uri))}", require_manifest=True)
    manifest = json.loads((Path(dest) / registry.MANIFEST).read_bytes())
    files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in Path(dest).rglob("*") if p.is_file()}
    assert set(manifest["files"]) == set(files) - {registry.MANIFEST}
    for rel, info in manifest["files"].items():
        assert storage.sha256_of(Path(dest) / rel) == info["sha256"], f"{uri}/{rel}"
    return files


# ------------------------------------------------------------------------------------- registry URIs


@pytest.mark.parametrize(
    ("uri", "tracking"),
    [
        ("mlflow+http://mlflow.mlflow.svc:5000", "http://mlflow.mlflow.svc:5000"),
        ("mlflow+https://mlflow.example.com/tracking/", "https://mlflow.example.com/tracking"),
        ("mlflow://", "http://from-the-environment:5000"),
    ],
)
def test_mlflow_uris_name_the_tracking_server(uri: str, tracking: str) -> None:
    location = locations.parse_mlflow(
        uri, environ={"MLFLOW_TRACKING_URI": "http://from-the-environment:5000"}
    )
    assert location.tracking_uri == tracking and location.experiment == locations.DEFAULT_EXPERIMENT
    assert registry.check_uri(uri) == uri
    options = locations.parse_mlflow(
        uri + "?artifacts=s3://bucket/models/&experiment=nightly&turn_timeout=30",
        environ={"MLFLOW_TRACKING_URI": "http://x"},
    )
    assert (options.artifacts, options.experiment, options.turn_timeout) == (
        "s3://bucket/models",
        "nightly",
        30.0,
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("mlflow+https://user:secret@mlflow.example.com", "carries credentials"),
        ("mlflow://mlflow:5000", "mlflow\\+http://host:port"),
        ("mlflow+http://", "names no MLflow server"),
        ("mlflow+http://host:5000?artifacts=/local/dir", "must be an s3://"),
        ("mlflow+http://host:5000?bucket=x", "unknown option"),
        ("mlflow+http://host:5000?turn_timeout=-1", "positive number"),
        ("gs://bucket/registry", "mlflow\\+http://host:port"),
    ],
)
def test_bad_registry_uris_are_refused_with_the_fix(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        registry.check_uri(uri)
    assert "secret" not in str(caught.value)


def test_mlflow_uri_without_a_server_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI, which is not set"):
        registry.current_champion("mlflow://", "policy")


# ------------------------------------------------------------------------------------ the mlflow backend


def test_promotions_into_mlflow_register_complete_versions_and_move_the_alias(
    mlflow_uri: str, client, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = _model(request)
    assert registry.current_champion(mlflow_uri, model) is None
    assert (
        registry.resolve_champion(mlflow_uri, model) == "" and registry.list_versions(mlflow_uri, model) == []
    )

    first = registry.promote(make_candidate(tmp_path / "a", "a"), mlflow_uri, model, GOOD, run_id="kfp-run-1")
    assert first["version"] == 1 and first["previous"] is None and first["model_uri"] == f"models:/{model}/1"

    # a second run reads the champion from MLflow, and promotes on top of it
    assert registry.resolve_champion(mlflow_uri, model) == first["uri"]
    second_metrics = {**GOOD, "kl_candidate_reference": 1.0}
    second = registry.promote(
        make_candidate(tmp_path / "b", "b"), mlflow_uri, model, second_metrics, run_id="kfp-run-2"
    )
    assert second["version"] == 2 and second["previous"] == 1
    champion = registry.current_champion(mlflow_uri, model)
    assert champion["version"] == 2 and champion["run_id"] == "kfp-run-2"
    assert champion["metrics"]["kl_candidate_reference"] == 1.0
    assert [v["version"] for v in registry.list_versions(mlflow_uri, model)] == [1, 2]

    # what MLflow itself shows: the alias, the version's model card, tags and its run's metrics and lineage
    assert client.get_registered_model(model).aliases == {"champion": "2"}
    version = client.get_model_version_by_alias(model, "champion")
    assert version.version == "2" and version.source == second["uri"] and version.status == "READY"
    assert "## Registry" in version.description and "kfp-run-2" in version.description
    assert version.tags["preftune.run_id"] == "kfp-run-2" and version.tags["preftune.previous"] == "1"
    assert version.tags[mlflow_turns.SETTLED] == "champion"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.metrics["kl_candidate_reference"] == 1.0 and run.data.metrics["win_rate_vs_champion"] == 0.7
    )
    assert run.data.params["stage"] == "dpo" and run.data.params["base_model"] == "tiny"
    assert "## Registry" in run.data.tags["mlflow.note.content"]

    # the files sit in the run's artifact directory, complete, and load like any preftune model
    files = _files_match_manifest(second["uri"], tmp_path)
    assert files["model.safetensors"] == FILES["model.safetensors"] + b"b"
    assert json.loads(files["lineage.json"])["registry"]["run_id"] == "kfp-run-2"
    assert json.loads(files[registry.MANIFEST])["mlflow_run_id"] == version.run_id
    assert Path(storage.local_path(champion["uri"]), "config.json").is_file()


def test_the_gate_compares_with_the_champion_the_same_way_on_both_backends(
    any_registry: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The pipeline's sequence -- champion step, gate, promote -- on each backend."""
    model = _model(request)
    thresholds = {k: v for k, v in THRESHOLDS.items() if k != "length_controlled"}

    def gate(metrics: dict, name: str) -> dict:
        champion = registry.resolve_champion(any_registry, model)
        return run_gate(metrics, str(tmp_path / f"{name}.html"), champion_uri=champion, **thresholds)

    no_comparison = {k: v for k, v in GOOD.items() if k != "win_rate_vs_champion"}
    first = gate(no_comparison, "first")
    assert first["promote"] and first["champion_uri"] == ""  # no champion yet: nothing to compare with
    v1 = registry.promote(
        make_candidate(tmp_path / "a", "a"), any_registry, model, no_comparison, decision=first
    )

    uncompared = gate(no_comparison, "uncompared")  # now a champion exists, so the comparison is required
    assert not uncompared["promote"] and uncompared["champion_uri"] == v1["uri"]
    assert any("win_rate_vs_champion" in reason for reason in uncompared["reasons"])
    with pytest.raises(registry.RegistryError, match="gate rejected"):
        registry.promote(make_candidate(tmp_path / "b", "b"), any_registry, model, GOOD, decision=uncompared)

    losing = gate({**GOOD, "win_rate_vs_champion": 0.3}, "losing")
    assert not losing["promote"]
    winning = gate(GOOD, "winning")
    assert winning["promote"] and winning["champion_uri"] == v1["uri"]
    v2 = registry.promote(make_candidate(tmp_path / "c", "c"), any_registry, model, GOOD, decision=winning)
    assert (v2["version"], v2["previous"]) == (2, 1)
    assert registry.current_champion(any_registry, model)["decision"]["champion_uri"] == v1["uri"]

    stale = winning  # compared with v1, but v2 is the champion now
    with pytest.raises(registry.StaleChampionError, match="NOT made the champion"):
        registry.promote(make_candidate(tmp_path / "d", "d"), any_registry, model, GOOD, decision=stale)
    assert registry.current_champion(any_registry, model)["version"] == 2
    assert [v["version"] for v in registry.list_versions(any_registry, model)] == [1, 2, 3]  # published

    rollback = registry.set_champion(any_registry, model, 1, reason="regression")
    assert (rollback["version"], rollback["previous"], rollback["reason"]) == (1, 2, "regression")
    assert registry.resolve_champion(any_registry, model) == v1["uri"]
    assert model in registry.list_models(any_registry)


def test_mlflow_model_files_go_to_s3_when_the_uri_says_so(
    mlflow_uri: str, s3, client, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = _model(request)
    uri = f"{mlflow_uri}?artifacts={s3.uri('mlflow-models')}&experiment=nightly"
    pointer = registry.promote(make_candidate(tmp_path / "a", "a"), uri, model, GOOD)
    assert pointer["uri"].startswith(s3.uri(f"mlflow-models/{model}/"))
    assert client.get_model_version_by_alias(model, "champion").source == pointer["uri"]
    assert client.get_experiment_by_name("nightly") is not None
    files = _files_match_manifest(pointer["uri"], tmp_path)
    assert files["model.safetensors"] == FILES["model.safetensors"] + b"a"
    assert registry.resolve_champion(uri, model) == pointer["uri"]


def test_mlflow_promotions_wait_for_the_one_ahead_and_skip_a_dead_one(
    mlflow_uri: str, client, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Versions registered by promotions still moving the alias hold their turn; one that never settles (its
    promotion died after registering) is passed over after turn_timeout, and then cannot move the alias."""
    model = _model(request)
    registry.promote(make_candidate(tmp_path / "a", "a"), mlflow_uri, model, GOOD)  # v1, settled
    source = registry.resolve_champion(mlflow_uri, model)
    run_id = client.get_model_version(model, "1").run_id
    for promotion in ("alive", "dead"):  # v2, v3: registered, their turn not taken yet
        client.create_model_version(model, source, run_id=run_id, tags={mlflow_turns.PROMOTION: promotion})

    settled_at: list[float] = []

    def alive_settles_once_v4_waits() -> None:
        while 4 not in mlflow_turns.all_versions(client, model):
            time.sleep(0.1)
        time.sleep(1.0)
        mlflow_turns.settle(client, model, 2, "not champion: refused")
        settled_at.append(time.monotonic())

    threading.Thread(target=alive_settles_once_v4_waits, daemon=True).start()
    pointer = registry.promote(
        make_candidate(tmp_path / "b", "b"), f"{mlflow_uri}?turn_timeout=4", model, GOOD
    )
    finished = time.monotonic()
    assert pointer["version"] == 4 and pointer["previous"] == 1
    assert (
        client.get_model_version(model, "2").tags[mlflow_turns.SETTLED] == "not champion: refused"
    )  # waited
    assert client.get_model_version(model, "3").tags[mlflow_turns.SETTLED].startswith("abandoned")
    assert settled_at and finished - settled_at[0] >= 4.0  # v3 had its 4 s without progress before the move
    with pytest.raises(registry.RegistryError, match="lost its turn"):
        mlflow_turns.wait_for_turn(
            client, model, 3, timeout=4
        )  # the dead one, back: it must not move the alias
    assert client.get_registered_model(model).aliases == {"champion": "4"}


def test_remove_partials_in_mlflow_deletes_the_files_and_run_of_a_promotion_that_died(
    mlflow_uri: str, client, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(request)
    registry.promote(make_candidate(tmp_path / "a", "a"), mlflow_uri, model, GOOD)
    from preftune.io.registry import mlflow_backend

    def dies(*args, **kwargs):
        raise ConnectionError("node lost before registering")

    with monkeypatch.context() as patch:
        patch.setattr(mlflow_backend.MlflowBackend, "_register", dies)
        with pytest.raises(ConnectionError):
            registry.promote(make_candidate(tmp_path / "b", "b"), mlflow_uri, model, GOOD)
    assert [v["version"] for v in registry.list_versions(mlflow_uri, model)] == [1]
    assert registry.current_champion(mlflow_uri, model)["version"] == 1
    removed = registry.remove_partials(mlflow_uri, model)
    assert len(removed) == 1 and not storage.exists(removed[0])
    assert Path(storage.local_path(registry.resolve_champion(mlflow_uri, model)), "config.json").is_file()
    assert registry.remove_partials(mlflow_uri, model) == []


# -------------------------------------------------------------------------------------------- concurrency

_WORKER = """
import json, os, sys, time
from preftune.io import registry
candidate, uri, model, go = sys.argv[1:5]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
run_id = os.path.basename(candidate)
pointer = registry.promote(candidate, uri, model, {"kl_candidate_reference": 1.0}, run_id=run_id)
print("POINTER " + json.dumps(pointer), flush=True)
"""


def _race(uri: str, model: str, tmp_path: Path) -> tuple[list[dict], dict[str, str]]:
    """Start WORKERS processes, each with its own candidate; once all are ready, let them promote at once.
    Returns the pointers they got and each candidate's path by name."""
    go = tmp_path / "go"
    candidates = {f"c{i}": make_candidate(tmp_path / f"c{i}", f"c{i}") for i in range(WORKERS)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, path, uri, model, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for path in candidates.values()
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.touch()
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    pointers = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        pointers += [
            json.loads(line[len("POINTER ") :]) for line in out.splitlines() if line.startswith("POINTER ")
        ]
    return pointers, candidates


def _check_race(
    uri: str, model: str, pointers: list[dict], candidates: dict[str, str], tmp_path: Path
) -> list[int]:
    """Every promotion is one complete version, none lost or duplicated; exactly one champion, at the end of
    one chain of ``previous`` through all of them. Returns the versions in the order they became champion."""
    assert len(pointers) == WORKERS
    versions = registry.list_versions(uri, model)
    assert sorted(v["version"] for v in versions) == list(range(1, WORKERS + 1))
    assert sorted(v["source_uri"] for v in versions) == sorted(candidates.values())  # none lost or duplicated
    assert len({v["promotion_id"] for v in versions}) == WORKERS
    for v in versions:
        files = _files_match_manifest(v["uri"], tmp_path)
        name = Path(v["source_uri"]).name
        assert files["model.safetensors"] == FILES["model.safetensors"] + name.encode(), v["uri"]  # not mixed
    by_previous = {p["previous"]: p["version"] for p in pointers}
    assert len(by_previous) == WORKERS  # no two promotions replaced the same champion
    order, current = [], None
    while current in by_previous:
        current = by_previous[current]
        order.append(current)
    assert sorted(order) == list(range(1, WORKERS + 1))
    champion = registry.current_champion(uri, model)
    assert champion["version"] == order[-1]
    assert registry.resolve_champion(uri, model) == next(
        v["uri"] for v in versions if v["version"] == order[-1]
    )
    return order


@pytest.fixture
def atomic_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with atomic_moto_server() as endpoint:
        yield s3_bucket(endpoint, monkeypatch, tmp_path)


def test_promotions_racing_into_s3_leave_one_champion_and_every_version(atomic_s3, tmp_path: Path) -> None:
    uri = atomic_s3.uri("registry")
    pointers, candidates = _race(uri, "policy", tmp_path)
    _check_race(uri, "policy", pointers, candidates, tmp_path)
    assert not atomic_s3.list_keys("registry/policy/.staging/") and not atomic_s3.list_keys(
        "registry/policy/.claims/"
    )


def test_promotions_racing_into_a_local_registry_leave_one_champion_and_every_version(tmp_path: Path) -> None:
    uri = str(tmp_path / "registry")
    pointers, candidates = _race(uri, "policy", tmp_path)
    _check_race(uri, "policy", pointers, candidates, tmp_path)
    assert not list((tmp_path / "registry" / "policy" / registry.STAGING).glob("*"))


def test_promotions_racing_into_mlflow_leave_one_champion_and_every_version(
    mlflow_uri: str, client, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = _model(request)
    pointers, candidates = _race(mlflow_uri, model, tmp_path)
    order = _check_race(mlflow_uri, model, pointers, candidates, tmp_path)
    assert order == list(range(1, WORKERS + 1))  # the alias moved in version order, one turn at a time
    registered = mlflow_turns.all_versions(client, model)
    assert sorted(registered) == list(range(1, WORKERS + 1))  # nothing registered twice
    assert all(mv.tags[mlflow_turns.SETTLED] == "champion" for mv in registered.values())
    assert client.get_registered_model(model).aliases == {"champion": str(WORKERS)}
