"""Render and apply the KServe InferenceService of an approved bundle."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

SERVICE_NAME = "crossrank-reranker"
RUNTIME_NAME = "crossrank-onnx"


def inference_service(storage_uri: str, namespace: str, name: str = SERVICE_NAME) -> dict[str, Any]:
    """Return the InferenceService that serves the bundle at `storage_uri` with the crossrank runtime.

    The fields mirror `kserve/base/inferenceservice.yaml`, which `kubectl apply -k`
    uses; this function serves the pipeline's deploy step, which has no checkout.
    """
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "crossrank"}},
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "model": {
                    "modelFormat": {"name": "crossrank-onnx", "version": "1"},
                    "runtime": RUNTIME_NAME,
                    "protocolVersion": "v1",
                    "storageUri": storage_uri,
                    "resources": {
                        "requests": {"cpu": "1", "memory": "1Gi"},
                        "limits": {"cpu": "2", "memory": "2Gi"},
                    },
                },
                "logger": {"mode": "response", "url": "http://crossrank-score-receiver.monitoring.svc.cluster.local/"},
            }
        },
    }


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _apply(manifest: dict[str, Any]) -> str:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config.load_incluster_config()
    api = client.CustomObjectsApi()
    namespace = manifest["metadata"]["namespace"]
    name = manifest["metadata"]["name"]
    args = ("serving.kserve.io", "v1beta1", namespace, "inferenceservices")
    try:
        api.get_namespaced_custom_object(*args, name)
    except ApiException as err:
        if err.status != 404:
            raise
        api.create_namespaced_custom_object(*args, manifest)
        return "created"
    api.patch_namespaced_custom_object(*args, name, manifest)
    return "patched"


def deploy_inference_service(storage_uri: str, manifest_path: Path, namespace: str) -> str:
    """Write the InferenceService manifest; inside a cluster also create or patch it.

    Returns "created", "patched" or "rendered" (outside a cluster, where the log
    says how to apply the manifest by hand).
    """
    manifest = inference_service(storage_uri, namespace)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    if not _in_cluster():
        logger.info("not inside a cluster: apply the manifest with `kubectl apply -f %s`", manifest_path)
        return "rendered"
    action = _apply(manifest)
    logger.info("%s InferenceService %s/%s", action, namespace, manifest["metadata"]["name"])
    return action
