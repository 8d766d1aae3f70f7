"""KServe manifests: each kustomize overlay renders and matches the KServe CRD schemas.

The CRDs' openAPIV3Schema is read from ../shared/schemas/kserve. The API server would
prune unknown fields of a CRD object; these tests reject them instead, as
`kubectl apply --validate=strict` does, so a misspelled field fails here.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from crossrank.serving.server import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
KSERVE = REPO_ROOT / "kserve"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kserve"
OVERLAYS = ("staging", "production")
NAMESPACES = {"staging": "crossrank-staging", "production": "crossrank"}
VALIDATED_KINDS = ("InferenceService", "ServingRuntime", "ClusterServingRuntime")
RECEIVER_URL = "http://crossrank-score-receiver.monitoring.svc.cluster.local/"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@dataclass(frozen=True)
class Crd:
    """The served versions of one KServe kind, with a strict validator per version."""

    group: str
    validators: dict[str, jsonschema.protocols.Validator]

    def api_versions(self) -> list[str]:
        return [f"{self.group}/{version}" for version in self.validators]


def strict(schema: Any) -> Any:
    """Return a copy of an OpenAPI schema where objects with `properties` reject other keys.

    Objects that allow any keys (`additionalProperties` set, or
    `x-kubernetes-preserve-unknown-fields`) keep their schema.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items() if key != "properties"}
    if "properties" in schema:
        result["properties"] = {name: strict(value) for name, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            result["additionalProperties"] = False
    return result


@pytest.fixture(scope="module")
def crds() -> dict[str, Crd]:
    """Load every KServe CRD of the validated kinds, keyed by kind."""
    found = {}
    for path in sorted(SCHEMAS.glob("serving.kserve.io_*.yaml")):
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = document["spec"]
        validators = {
            version["name"]: jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))
            for version in spec["versions"]
            if version.get("served", True)
        }
        found[spec["names"]["kind"]] = Crd(spec["group"], validators)
    missing = [kind for kind in VALIDATED_KINDS if kind not in found]
    assert not missing, f"no CRD for {missing} in {SCHEMAS}"
    return found


def render(folder: Path) -> list[dict[str, Any]]:
    """Run `kubectl kustomize` on a folder and return its objects."""
    completed = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return [document for document in yaml.safe_load_all(completed.stdout) if document]


def schema_errors(manifest: dict[str, Any], crds: dict[str, Crd]) -> list[str]:
    """Return one line per schema violation of a KServe object; empty when it is valid."""
    crd = crds[manifest["kind"]]
    group, _, version = manifest["apiVersion"].partition("/")
    if group != crd.group or version not in crd.validators:
        return [f"apiVersion {manifest['apiVersion']} is not served; expected one of {crd.api_versions()}"]
    errors = crd.validators[version].iter_errors(manifest)
    return sorted(f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}" for error in errors)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [manifest for manifest in objects if manifest["kind"] == kind]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Render the base and each overlay once."""
    folders = {"base": KSERVE / "base", **{name: KSERVE / "overlays" / name for name in OVERLAYS}}
    return {name: render(folder) for name, folder in folders.items()}


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_rendered_objects_match_crd_schemas(name: str, rendered: dict, crds: dict[str, Crd]) -> None:
    objects = [manifest for manifest in rendered[name] if manifest["kind"] in VALIDATED_KINDS]
    assert len(by_kind(objects, "InferenceService")) == 1
    assert len(by_kind(objects, "ServingRuntime")) + len(by_kind(objects, "ClusterServingRuntime")) == 1
    for manifest in objects:
        assert schema_errors(manifest, crds) == [], f"{manifest['kind']} {manifest['metadata']['name']}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_runtime_serves_inference_service(name: str, rendered: dict) -> None:
    (service,) = by_kind(rendered[name], "InferenceService")
    (runtime,) = by_kind(rendered[name], "ServingRuntime")
    model = service["spec"]["predictor"]["model"]

    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert service["metadata"]["namespace"] == runtime["metadata"]["namespace"] == NAMESPACES[name]
    assert model["storageUri"].startswith(("s3://", "pvc://"))


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_logs_payloads_to_receiver(name: str, rendered: dict) -> None:
    (service,) = by_kind(rendered[name], "InferenceService")
    assert service["spec"]["predictor"]["logger"] == {"mode": "response", "url": RECEIVER_URL}


def test_overlays_differ_in_scale(rendered: dict) -> None:
    (staging,) = by_kind(rendered["staging"], "InferenceService")
    (production,) = by_kind(rendered["production"], "InferenceService")
    staging, production = staging["spec"]["predictor"], production["spec"]["predictor"]

    assert (staging["minReplicas"], staging["maxReplicas"]) == (1, 2)
    assert (production["minReplicas"], production["maxReplicas"]) == (2, 10)
    assert "canaryTrafficPercent" not in staging
    assert production["canaryTrafficPercent"] == 10
    assert staging["model"]["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert production["model"]["resources"]["limits"] == {"cpu": "4", "memory": "3Gi"}
    assert staging["model"]["env"] == [{"name": "CROSSRANK_INTRA_OP_THREADS", "value": "1"}]
    assert production["model"]["env"] == [{"name": "CROSSRANK_INTRA_OP_THREADS", "value": "4"}]


def test_runtime_args_are_serve_options(rendered: dict) -> None:
    (runtime,) = by_kind(rendered["production"], "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    # KServe replaces {{.Name}} with the InferenceService name.
    args = [arg.replace("{{.Name}}", "crossrank-reranker") for arg in container["args"]]

    options = build_parser().parse_args(args)

    assert container["command"] == ["crossrank", "serve"]
    assert options.model_dir == Path("/mnt/models")
    assert options.model_name == "crossrank-reranker"
    assert options.token_store == Path("/mnt/models/token_store.sqlite")
    assert options.score_cache == Path("/mnt/models/score_cache.sqlite")
    assert options.http_port == container["ports"][0]["containerPort"] == 8080


def test_schema_rejects_misspelled_field(rendered: dict, crds: dict[str, Crd]) -> None:
    (service,) = by_kind(rendered["production"], "InferenceService")
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["minReplica"] = 2

    assert schema_errors(broken, crds) == [
        "spec.predictor: Additional properties are not allowed ('minReplica' was unexpected)"
    ]


def test_schema_rejects_wrong_type(rendered: dict, crds: dict[str, Crd]) -> None:
    (service,) = by_kind(rendered["production"], "InferenceService")
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["maxReplicas"] = "ten"

    assert schema_errors(broken, crds) == ["spec.predictor.maxReplicas: 'ten' is not of type 'integer'"]


def test_schema_rejects_unknown_logger_mode(rendered: dict, crds: dict[str, Crd]) -> None:
    (service,) = by_kind(rendered["staging"], "InferenceService")
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["logger"]["mode"] = "everything"

    assert schema_errors(broken, crds) == [
        "spec.predictor.logger.mode: 'everything' is not one of ['all', 'request', 'response']"
    ]


def test_schema_rejects_misspelled_runtime_field(rendered: dict, crds: dict[str, Crd]) -> None:
    (runtime,) = by_kind(rendered["staging"], "ServingRuntime")
    broken = copy.deepcopy(runtime)
    broken["spec"]["supportedModelFormat"] = broken["spec"].pop("supportedModelFormats")

    assert schema_errors(broken, crds) == [
        "spec: Additional properties are not allowed ('supportedModelFormat' was unexpected)"
    ]


def test_misspelled_overlay_patch_fails(tmp_path: Path, crds: dict[str, Crd]) -> None:
    base = os.path.relpath(KSERVE / "base", tmp_path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "patches": [
            {
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "serving.kserve.io/v1beta1",
                        "kind": "InferenceService",
                        "metadata": {"name": "crossrank-reranker"},
                        "spec": {"predictor": {"canaryTraficPercent": 10}},
                    }
                )
            }
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")

    (service,) = by_kind(render(tmp_path), "InferenceService")

    assert schema_errors(service, crds) == [
        "spec.predictor: Additional properties are not allowed ('canaryTraficPercent' was unexpected)"
    ]


def test_deploy_step_manifest_matches_crd(crds: dict[str, Crd], tmp_path: Path) -> None:
    from crossrank.deploy import deploy_inference_service

    manifest_path = tmp_path / "isvc.yaml"
    action = deploy_inference_service("pvc://models/crossrank/bundle", manifest_path, "crossrank")
    manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    assert action == "rendered"
    assert schema_errors(manifest, crds) == []
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/crossrank/bundle"
