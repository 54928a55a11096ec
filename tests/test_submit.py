"""`preftune submit` / `schedule` against a stand-in for the KFP v2beta1 REST API on 127.0.0.1.

The stand-in answers what ``kfp.Client`` actually calls (observed: healthz, pipeline lookup by name, upload,
upload_version, version listing, experiment lookup / creation, runs, recurring runs) with minimal valid JSON and
records every request, so the tests assert on what reached the server.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from preftune.orchestration import kfp_api

PACKAGE = kfp_api.pipeline_package("dpo")


@dataclass
class FakeKFP:
    """State of the stand-in server and every request it received."""

    host: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    pipelines: dict[str, str] = field(default_factory=dict)  # display name -> id
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # pipeline id -> versions
    uploads: list[bytes] = field(default_factory=list)
    experiments: dict[str, str] = field(default_factory=dict)
    recurring: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> the created recurring run

    def posted(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"] == path]


def _multipart_file(body: bytes, content_type: str) -> bytes:
    boundary = content_type.split("boundary=", 1)[1].encode()
    for part in body.split(b"--" + boundary):
        if b'name="uploadfile"' in part:
            return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    raise AssertionError("no uploadfile part")


def _filter_name(query: dict[str, list[str]]) -> str | None:
    raw = query.get("filter", [""])[0]
    if not raw:
        return None
    return json.loads(raw)["predicates"][0]["stringValue"]


def _handler(state: FakeKFP) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlparse(self.path)
            query = parse_qs(url.query)
            state.requests.append(
                {
                    "method": self.command,
                    "path": url.path,
                    "query": query,
                    "body": body,
                    "authorization": self.headers.get("Authorization"),
                }
            )
            self._answer(self._route(url.path, query, body))

        def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> dict[str, Any]:
            base = "/apis/v2beta1/"
            route = path[len(base) :] if path.startswith(base) else path
            if route == "healthz":
                return {"multi_user": False}
            if route == "pipelines" and self.command == "GET":
                name = _filter_name(query)
                if name in state.pipelines:
                    return {"pipelines": [{"pipeline_id": state.pipelines[name], "display_name": name}]}
                return {}
            if route in ("pipelines/upload", "pipelines/upload_version"):
                state.uploads.append(_multipart_file(body, self.headers["Content-Type"]))
                if route == "pipelines/upload":
                    name = query["name"][0]
                    pipeline_id = state.pipelines[name] = f"pipeline-{len(state.pipelines) + 1}"
                else:
                    pipeline_id = query["pipelineid"][0]
                    name = query["name"][0]
                versions = state.versions.setdefault(pipeline_id, [])
                version = {
                    "pipeline_id": pipeline_id,
                    "pipeline_version_id": f"{pipeline_id}-v{len(versions) + 1}",
                    "display_name": name,
                }
                versions.insert(0, version)  # newest first, as listed with sort_by created_at desc
                if route == "pipelines/upload":
                    return {"pipeline_id": pipeline_id, "display_name": name}
                return version
            if route.startswith("pipelines/") and route.endswith("/versions"):
                return {"pipeline_versions": state.versions.get(route.split("/")[1], [])}
            if route == "experiments" and self.command == "GET":
                name = _filter_name(query)
                if name in state.experiments:
                    return {"experiments": [{"experiment_id": state.experiments[name], "display_name": name}]}
                return {}
            if route == "experiments":
                name = json.loads(body)["display_name"]
                state.experiments[name] = f"experiment-{len(state.experiments) + 1}"
                return {"experiment_id": state.experiments[name], "display_name": name}
            if route == "runs":
                return {"run_id": "run-1", "display_name": json.loads(body)["display_name"]}
            if route == "recurringruns" and self.command == "GET":
                return self._list_recurring(query)
            if route.startswith("recurringruns/") and self.command == "DELETE":
                state.recurring.pop(route.split("/")[1])
                return {}
            if route == "recurringruns":
                created = json.loads(body)
                recurring_id = f"recurring-{len(state.requests)}"
                state.recurring[recurring_id] = {**created, "recurring_run_id": recurring_id}
                return {"recurring_run_id": recurring_id, "display_name": created["display_name"]}
            return {}

        def _list_recurring(self, query: dict[str, list[str]]) -> dict[str, Any]:
            """One recurring run per page, so that the client's paging is exercised too."""
            name = _filter_name(query)
            experiment = query.get("experiment_id", [None])[0]
            matching = [
                r
                for r in state.recurring.values()
                if (name is None or r["display_name"] == name) and r.get("experiment_id") == experiment
            ]
            start = int(query.get("page_token", ["0"])[0] or 0)
            page = {"recurringRuns": matching[start : start + 1]}
            if start + 1 < len(matching):
                page["next_page_token"] = str(start + 1)
            return page

        do_GET = do_POST = do_DELETE = _handle

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def kfp_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKFP]:
    state = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    state.host = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv(kfp_api.DEFAULT_TOKEN_ENV, raising=False)
    monkeypatch.setenv(kfp_api.SA_TOKEN_PATH_ENV, str(tmp_path / "no-token"))
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _args(kind: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    (kfp_api.add_submit_arguments if kind == "submit" else kfp_api.add_schedule_arguments)(parser)
    return parser.parse_args(list(argv))


def test_submit_uploads_the_pipeline_and_starts_a_run(kfp_server: FakeKFP, monkeypatch) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    args = _args(
        "submit",
        "dpo",
        "--host",
        kfp_server.host,
        "--param",
        "dpo_beta=0.2",
        "--param",
        "base_model=s3://models/base",
        "--param",
        "use_lora=false",
        "--experiment",
        "nightly",
        "--run-name",
        "try-1",
        "--service-account",
        "preftune-pipeline-runner",
    )
    assert kfp_api.run_submit(args) == 0

    assert kfp_server.uploads == [PACKAGE.read_bytes()]
    (upload,) = kfp_server.posted("/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["preftune-dpo"]
    assert not kfp_server.posted("/apis/v2beta1/pipelines/upload_version")
    (run,) = kfp_server.posted("/apis/v2beta1/runs")
    body = json.loads(run["body"])
    assert body["display_name"] == "try-1"
    assert body["experiment_id"] == kfp_server.experiments["nightly"]
    assert body["runtime_config"]["parameters"] == {
        "dpo_beta": 0.2,
        "base_model": "s3://models/base",
        "use_lora": False,
    }
    assert body["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-1",
        "pipeline_version_id": "pipeline-1-v1",
    }
    assert body["service_account"] == "preftune-pipeline-runner"
    assert all(r["authorization"] == "Bearer secret-token" for r in kfp_server.requests)


def test_existing_pipeline_gets_a_new_version_not_a_duplicate(kfp_server: FakeKFP) -> None:
    for _ in range(2):
        assert kfp_api.run_submit(_args("submit", "dpo", "--host", kfp_server.host)) == 0
    assert len(kfp_server.posted("/apis/v2beta1/pipelines/upload")) == 1
    (version,) = kfp_server.posted("/apis/v2beta1/pipelines/upload_version")
    assert version["query"]["pipelineid"] == ["pipeline-1"]
    assert version["query"]["name"][0].startswith("preftune-dpo-")
    assert kfp_server.uploads == [PACKAGE.read_bytes()] * 2
    runs = [json.loads(r["body"]) for r in kfp_server.posted("/apis/v2beta1/runs")]
    assert [r["pipeline_version_reference"]["pipeline_version_id"] for r in runs] == [
        "pipeline-1-v1",
        "pipeline-1-v2",
    ]
    assert len(kfp_server.posted("/apis/v2beta1/experiments")) == 1  # the second run reuses the experiment
    assert all(r["authorization"] is None for r in kfp_server.requests)  # port-forwarded: no credentials


def test_schedule_creates_a_recurring_run(kfp_server: FakeKFP) -> None:
    args = _args(
        "schedule",
        "dpo",
        "--host",
        kfp_server.host,
        "--cron",
        "0 0 2 * * *",
        "--param",
        "since=2026-11-01",
        "--name",
        "dpo-nightly",
    )
    assert kfp_api.run_schedule(args) == 0
    (created,) = kfp_server.posted("/apis/v2beta1/recurringruns")
    body = json.loads(created["body"])
    assert body["display_name"] == "dpo-nightly"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert body["no_catchup"] is True
    assert str(body["max_concurrency"]) == "1"  # int64: the client sends 1, the server echoes "1"
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"since": "2026-11-01"}
    assert body["pipeline_version_reference"]["pipeline_id"] == "pipeline-1"
    assert kfp_server.uploads == [PACKAGE.read_bytes()]


def test_service_account_token_is_used_inside_a_pod(kfp_server: FakeKFP, monkeypatch, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("pod-token")
    monkeypatch.setenv(kfp_api.SA_TOKEN_PATH_ENV, str(token))
    assert kfp_api.run_submit(_args("submit", "dpo", "--host", kfp_server.host)) == 0
    assert {r["authorization"] for r in kfp_server.requests} == {"Bearer pod-token"}


@pytest.mark.parametrize("cron", ["0 2 * * *", "daily", "0 0 2 * * * *"])
def test_cron_must_have_six_fields(kfp_server: FakeKFP, cron: str, capsys) -> None:
    args = _args("schedule", "dpo", "--host", kfp_server.host, "--cron", cron)
    assert kfp_api.run_schedule(args) == 2
    err = capsys.readouterr().err
    assert "expects 6" in err and "0 0 2 * * *" in err
    if cron == "0 2 * * *":
        assert "did you mean '0 0 2 * * *'" in err
    assert kfp_server.requests == []  # refused before contacting the server


def test_bad_parameter_is_refused_before_contacting_the_server(kfp_server: FakeKFP, capsys) -> None:
    args = _args("submit", "dpo", "--host", kfp_server.host, "--param", "dpo_loss=nope")
    assert kfp_api.run_submit(args) == 2
    assert "dpo_loss" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_server_errors_are_reported(monkeypatch, capsys) -> None:
    class Refusing:
        def get_pipeline_id(self, name: str) -> None:
            raise RuntimeError("403 Forbidden: no access to namespace")

    monkeypatch.setattr(kfp_api, "make_client", lambda *a, **k: Refusing())
    assert kfp_api.run_submit(_args("submit", "dpo", "--host", "http://127.0.0.1:9")) == 1
    assert "403 Forbidden" in capsys.readouterr().err


def test_schedule_twice_leaves_one_recurring_run(kfp_server: FakeKFP, capsys) -> None:
    """A redeploy runs `preftune schedule` again: the recurring run of that name is replaced, not doubled."""
    argv = ["dpo", "--host", kfp_server.host, "--cron", "0 0 2 * * *", "--name", "dpo-nightly"]
    other = ["dpo", "--host", kfp_server.host, "--cron", "0 0 3 * * *", "--name", "dpo-weekly"]
    assert kfp_api.run_schedule(_args("schedule", *other)) == 0
    assert kfp_api.run_schedule(_args("schedule", *argv)) == 0
    (first,) = [i for i, r in kfp_server.recurring.items() if r["display_name"] == "dpo-nightly"]
    assert kfp_api.run_schedule(_args("schedule", *argv, "--param", "since=2026-11-01")) == 0
    nightly = {i: r for i, r in kfp_server.recurring.items() if r["display_name"] == "dpo-nightly"}
    assert len(nightly) == 1 and first not in nightly, "the earlier recurring run was replaced"
    (latest,) = nightly.values()
    assert latest["runtime_config"]["parameters"] == {"since": "2026-11-01"}
    assert {r["display_name"] for r in kfp_server.recurring.values()} == {"dpo-nightly", "dpo-weekly"}
    deletes = [r for r in kfp_server.requests if r["method"] == "DELETE"]
    assert [r["path"] for r in deletes] == [f"/apis/v2beta1/recurringruns/{first}"]
    assert f"replaced the earlier recurring run {first}" in capsys.readouterr().out
    # and once more with two stale copies (made by an older preftune): both go, one stays
    kfp_server.recurring["stale"] = {**latest, "recurring_run_id": "stale"}
    assert kfp_api.run_schedule(_args("schedule", *argv)) == 0
    assert sum(r["display_name"] == "dpo-nightly" for r in kfp_server.recurring.values()) == 1


def test_pipeline_root_per_run(kfp_server: FakeKFP) -> None:
    root = "minio://mlpipeline/v2/artifacts/team-a"
    assert kfp_api.run_submit(_args("submit", "dpo", "--host", kfp_server.host, "--pipeline-root", root)) == 0
    (run,) = kfp_server.posted("/apis/v2beta1/runs")
    assert json.loads(run["body"])["runtime_config"]["pipeline_root"] == root
    s3_root = "s3://preftune-artifacts/nightly"
    argv = ["dpo", "--host", kfp_server.host, "--cron", "0 0 2 * * *", "--pipeline-root", s3_root]
    assert kfp_api.run_schedule(_args("schedule", *argv)) == 0
    (created,) = kfp_server.recurring.values()
    assert created["runtime_config"]["pipeline_root"] == s3_root


@pytest.mark.parametrize("root", ["/local/dir", "http://minio:9000/bucket", "s3://"])
def test_a_pipeline_root_outside_object_storage_is_refused(kfp_server: FakeKFP, root: str, capsys) -> None:
    assert kfp_api.run_submit(_args("submit", "dpo", "--host", kfp_server.host, "--pipeline-root", root)) == 2
    assert "pipeline root" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_the_pipeline_names_written_out_for_help_are_the_pipelines() -> None:
    from preftune.orchestration.kfp_api import PIPELINE_NAMES
    from preftune.pipelines import PIPELINES

    assert tuple(sorted(PIPELINES)) == PIPELINE_NAMES
