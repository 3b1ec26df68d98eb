"""Kubernetes manifests: valid against the Kubernetes API schemas (kubernetes-validate, no cluster
needed), consistent with each other, and with what the service really reads and serves."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema ships for these; checked by hand below


def manifests(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def applied() -> dict[str, dict]:
    """Kind -> object, for everything the kustomization applies."""
    objects = {}
    for resource in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        for obj in manifests(resource):
            assert obj["kind"] not in objects, f"one {obj['kind']} expected"
            objects[obj["kind"]] = obj
    return objects


def container(objects: dict[str, dict]) -> dict:
    (app,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return app


def settings_env_names() -> set[str]:
    from service import Settings

    return {f"{Settings.model_config['env_prefix']}{name}".upper() for name in Settings.model_fields}


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_is_valid_against_the_kubernetes_schema(path):
    for obj in manifests(path):
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    deployment = applied()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"secret.example.yaml"}, "a real admin token is never overwritten by an apply"
    assert listed <= on_disk


def test_probes_and_ports_are_the_services_own(live_server, client):
    objects = applied()
    app = container(objects)
    (port,) = app["ports"]
    config = objects["ConfigMap"]["data"]
    assert port["containerPort"] == int(config["DYCE_PORT"]) and config["DYCE_HOST"] == "0.0.0.0"
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert client.get(annotations["prometheus.io/path"]).text.count("dyce_model_ready") >= 1

    assert app["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert app["livenessProbe"]["httpGet"]["path"] == app["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert app[probe]["httpGet"]["port"] == port["name"]
        assert client.get(app[probe]["httpGet"]["path"]).status_code == 200, probe

    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    (endpoint,) = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == annotations["prometheus.io/path"]


def test_selectors_pick_the_deployments_pods():
    objects = applied()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": objects["Deployment"]["spec"]["selector"]["matchLabels"],
        "Service": objects["Service"]["spec"]["selector"],
        "PodDisruptionBudget": objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), kind
    # The ServiceMonitor selects the Service, by the Service's own labels.
    assert objects["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= (
        objects["Service"]["metadata"]["labels"].items()
    )
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2, "one replica is a single point of failure"


def test_settings_come_from_the_configmap_and_the_token_from_the_secret(monkeypatch):
    objects = applied()
    app = container(objects)
    config = objects["ConfigMap"]["data"]
    assert app["envFrom"] == [{"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}}]
    (token_env,) = app["env"]
    (secret,) = manifests("secret.example.yaml")
    ref = token_env["valueFrom"]["secretKeyRef"]
    assert token_env["name"] == "DYCE_ADMIN_TOKEN" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]

    names = set(config) | {token_env["name"]}
    assert names <= settings_env_names(), f"not settings: {sorted(names - settings_env_names())}"

    # The service parses the ConfigMap's values as a replica would read them from its environment.
    from service import Settings

    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DYCE_ADMIN_TOKEN", "k8s-test-token-0123456789")
    settings = Settings()
    assert settings.port == container(objects)["ports"][0]["containerPort"]
    cpu_limit = int(app["resources"]["limits"]["cpu"])
    assert settings.torch_threads == cpu_limit, "one intra-op thread per CPU the pod may use"
    assert settings.autoswitch == "auto"

    # The example Secret fails closed: a replica that got it unchanged refuses to start.
    monkeypatch.setenv("DYCE_ADMIN_TOKEN", secret["stringData"][ref["key"]])
    with pytest.raises(ValidationError, match="DYCE_ADMIN_TOKEN"):
        Settings()


def test_pods_run_non_root_on_a_read_only_root_filesystem():
    objects = applied()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    app = container(objects)
    dockerfile = (K8S.parents[1] / "Dockerfile").read_text()
    image_uid = int(re.search(r"^ARG UID=(\d+)$", dockerfile, re.MULTILINE).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == image_uid
    security = app["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The one writable path, where the image points every cache and temporary file (TMPDIR etc.).
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = app["volumeMounts"]
    assert mount["mountPath"] == "/tmp" and "emptyDir" in volumes[mount["name"]]
    assert re.search(r"TMPDIR=/tmp\b", dockerfile) and re.search(r"XDG_CACHE_HOME=/tmp/", dockerfile)
    assert {"requests", "limits"} <= app["resources"].keys()
    assert app["resources"]["requests"]["memory"] and app["resources"]["limits"]["memory"]
