"""The Kubernetes API calls of the TrainJob launcher, through the official ``kubernetes`` client.

In a pod the client is configured as the pod's service account (``InClusterConfigLoader``): it reads the
projected token itself and reads it again once it is a minute old, so a day-long wait outlives the kubelet's
token rotation. Every call returns the object as the API sent it (custom objects as the client gives them;
pods and logs undecoded, see :meth:`KubeClient._raw`) and fails with :class:`KubeError`, which keeps the HTTP
status for the launcher's retry decisions and says how to fix a refusal: the Role this file's calls need
(``infra/k8s/trainjob-launcher-rbac.yaml``, checked against these methods by tests/test_infra.py) or an
absent Kubeflow Trainer. ``kubernetes`` is imported on first use: the launcher module stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: The manifest that grants these calls to the pipelines' service account.
RBAC_MANIFEST = "infra/k8s/trainjob-launcher-rbac.yaml"
RBAC_ROLE = "preftune-trainjob-launcher"


class KubeError(RuntimeError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500

    @property
    def deterministic(self) -> bool:
        """A refusal that a retry of the step meets again (missing RBAC, no Trainer, an invalid TrainJob)."""
        return self.status in (400, 403, 404, 422)


def _server_message(exc: Any) -> str:
    """The ``message`` of the API's Status object, else the raw body or reason."""
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
    try:
        return str(json.loads(body).get("message") or body).strip()
    except (TypeError, ValueError, AttributeError):
        return str(body or exc.reason or "").strip()


def _refusal(what: str, status: int, message: str) -> str:
    text = f"{what}: HTTP {status}: {message}"
    if status == 403:
        return (
            f"{text}\nThis step's service account may not do this: apply {RBAC_MANIFEST} (Role {RBAC_ROLE}, "
            "bound to the service account the pipeline's steps run as) in the step's namespace."
        )
    if status == 404 and what.startswith("create TrainJob"):
        return (
            f"{text}\nNo TrainJob API here: multi-node training (num_nodes > 1) needs Kubeflow Trainer v2.2 or "
            f"later ({GROUP}/{VERSION}) in the cluster."
        )
    return text


class KubeClient:
    """The few Kubernetes API calls the launcher makes; each maps to one rule of the launcher's Role."""

    def __init__(self, api_client: ApiClient, *, timeout: float = 30.0) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.timeout = timeout

    @classmethod
    def in_cluster(cls, account_dir: Path = SERVICE_ACCOUNT_DIR, *, timeout: float = 30.0) -> KubeClient:
        """The API server of the cluster this pod runs in, as the pod's (rotating) service-account token."""
        from kubernetes import client
        from kubernetes.config.config_exception import ConfigException
        from kubernetes.config.incluster_config import InClusterConfigLoader

        configuration = client.Configuration()
        loader = InClusterConfigLoader(
            token_filename=str(account_dir / "token"), cert_filename=str(account_dir / "ca.crt")
        )
        try:
            loader.load_and_set(configuration)  # sets the token refresh hook; not the global default
        except ConfigException as exc:
            raise KubeError(
                f"not running in a Kubernetes pod ({exc}): multi-node training (num_nodes > 1) needs a "
                "cluster with Kubeflow Trainer"
            ) from None
        return cls(client.ApiClient(configuration), timeout=timeout)

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return method(*args, _request_timeout=self.timeout, **kwargs)
        except ApiException as exc:
            status = int(exc.status or 0)
            raise KubeError(_refusal(what, status, _server_message(exc)), status) from None
        except HTTPError as exc:  # not reached: connection refused, reset, timed out
            raise KubeError(f"{what}: {exc}") from exc

    def _raw(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
        """The response body undecoded: the client's own decoding turns a log line that parses as JSON
        into a Python repr, and a pod of a newer Kubernetes needs no model of this client's version."""
        response = self._call(what, method, *args, _preload_content=False, **kwargs)
        try:
            return response.data
        finally:
            response.release_conn()

    def create_trainjob(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        # Strict: a field this cluster's Trainer does not know (an older CRD) is an error, not silently dropped
        name = body.get("metadata", {}).get("name", "")
        return self._call(
            f"create TrainJob {namespace}/{name}",
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            body,
            field_validation="Strict",
        )

    def get_trainjob(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(
            f"get TrainJob {namespace}/{name}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
        )

    def delete_trainjob(self, namespace: str, name: str) -> None:
        # Background: the API returns at once and the garbage collector removes the JobSet and its pods.
        self._call(
            f"delete TrainJob {namespace}/{name}",
            self.custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            propagation_policy="Background",
        )

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return json.loads(
            self._raw(f"get pod {namespace}/{name}", self.core.read_namespaced_pod, name, namespace)
        )

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = self._raw(
            f"list pods {namespace} ({label_selector})",
            self.core.list_namespaced_pod,
            namespace,
            label_selector=label_selector,
        )
        return list(json.loads(found).get("items") or [])

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        text = self._raw(
            f"log of pod {namespace}/{name}",
            self.core.read_namespaced_pod_log,
            name,
            namespace,
            container=container,
            tail_lines=tail_lines,
        )
        return text.decode("utf-8", "replace")
