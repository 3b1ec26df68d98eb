"""Dockerfile and compose stack. No Docker engine runs here (nor in CI), so these check what can be
checked without one: the compose files through Debian's ``docker-compose config``, the
Dockerfile's stages and settings against the project, and its HEALTHCHECK command run for real
against a live service."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "deploy" / "docker-compose.gpu.yml"
SECRETS = {"DYCE_ADMIN_TOKEN": "compose-test-token-0123456789", "GRAFANA_ADMIN_PASSWORD": "compose-test-password"}


def settings_env_names() -> set[str]:
    from service import Settings

    prefix = Settings.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def compose_config(*files: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["docker-compose", "--project-directory", str(ROOT)]
    for file in files:
        args += ["-f", str(file)]
    # Only PATH from the caller's environment, so a DYCE_* variable set there changes nothing.
    return subprocess.run(
        [*args, "config"], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=60
    )


def resolved_compose(*files: Path) -> dict:
    rendered = compose_config(*files, env=SECRETS)
    assert rendered.returncode == 0, rendered.stderr
    return yaml.safe_load(rendered.stdout)


def bind_mounts(service: dict) -> dict[str, tuple[Path, bool]]:
    """Container path -> (host path, read-only) for the bind mounts of one resolved service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":") if isinstance(volume, str) else (volume["source"], volume["target"])
        if isinstance(volume, dict):
            mode = ["ro"] if volume.get("read_only") else []
        if source.startswith("/"):
            mounts[target] = (Path(source), mode == ["ro"])
    return mounts


class Dockerfile:
    """Stages and instructions, with line continuations joined."""

    def __init__(self, path: Path) -> None:
        lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
        self.args: dict[str, str] = {}
        self.stages: dict[str, list[tuple[str, str]]] = {}
        self.parents: dict[str, str] = {}
        current = None
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            instruction, _, rest = line.strip().partition(" ")
            instruction = instruction.upper()
            if instruction == "FROM":
                base, _, name = rest.partition(" AS ")
                current = name.strip()
                self.parents[current] = base.strip()
                self.stages[current] = []
            elif current is None and instruction == "ARG":
                key, _, value = rest.partition("=")
                self.args[key] = value
            elif current is not None:
                self.stages[current].append((instruction, rest))

    def lineage(self, stage: str) -> list[str]:
        """The stage and the stages it is built FROM, nearest first."""
        chain = [stage]
        while (parent := self.parents.get(chain[-1])) in self.stages:
            chain.append(parent)
        return chain

    def instructions(self, stage: str, kind: str) -> list[str]:
        return [rest for s in self.lineage(stage) for instruction, rest in self.stages[s] if instruction == kind]

    def env(self, stage: str) -> dict[str, str]:
        values = {}
        for rest in reversed(self.instructions(stage, "ENV")):
            values |= dict(shlex.split(pair)[0].split("=", 1) for pair in re.findall(r"\S+=\S+", rest))
        return values


DOCKERFILE = Dockerfile(ROOT / "Dockerfile")


def test_compose_config_accepts_the_stack_and_wires_it_together():
    config = resolved_compose(COMPOSE)
    services = config["services"]
    assert set(services) == {"dyce", "prometheus", "grafana"}
    dyce = services["dyce"]
    assert dyce["build"]["target"] == "runtime" and dyce["read_only"] is True
    assert set(dyce["environment"]) <= settings_env_names(), "compose sets only real DYCE_* settings"
    assert dyce["environment"]["DYCE_ADMIN_TOKEN"] == SECRETS["DYCE_ADMIN_TOKEN"]

    # The artefacts are mounted read-only where the image's settings look for them.
    image_env = DOCKERFILE.env("runtime")
    mounts = bind_mounts(dyce)
    assert mounts[image_env["DYCE_ARTIFACTS_DIR"]] == (ROOT / "artifacts", True)
    port = int(image_env["DYCE_PORT"])
    assert [(p["target"], p["published"]) for p in dyce["ports"]] == [(port, port)]

    # Prometheus runs the repository's config, whose target is this service on its port.
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_in_container = Path(config_flag.split("=", 1)[1])
    host_dir, read_only = bind_mounts(prometheus)[str(config_in_container.parent)]
    assert read_only and host_dir == ROOT / "deploy" / "prometheus"
    scrape = yaml.safe_load((host_dir / config_in_container.name).read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"dyce:{port}"]

    # Grafana: provisioning and dashboards mounted where the provisioning files point.
    grafana = services["grafana"]
    grafana_mounts = bind_mounts(grafana)
    assert grafana_mounts["/etc/grafana/provisioning"] == (ROOT / "deploy" / "grafana" / "provisioning", True)
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dyce.yml").read_text())["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    assert grafana_mounts[dashboards_dir] == (ROOT / "deploy" / "grafana" / "dashboards", True)
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert json.loads((ROOT / "deploy/grafana/dashboards" / home.relative_to(dashboards_dir)).read_text())["uid"]
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    prometheus_port = prometheus["ports"][0]["target"]
    assert datasources["datasources"][0]["url"] == f"http://prometheus:{prometheus_port}"


def test_compose_refuses_to_start_without_secrets():
    for missing in SECRETS:
        rendered = compose_config(COMPOSE, env={k: v for k, v in SECRETS.items() if k != missing})
        assert rendered.returncode != 0 and missing in rendered.stderr


def test_compose_gpu_override_builds_the_gpu_target_with_a_device():
    dyce = resolved_compose(COMPOSE, GPU_OVERRIDE)["services"]["dyce"]
    assert dyce["build"]["target"] == "gpu" and "gpu" in DOCKERFILE.stages
    assert dyce["environment"]["DYCE_DEVICE"] == "cuda" == DOCKERFILE.env("gpu")["DYCE_DEVICE"]
    (device,) = dyce["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "onnxruntime-gpu" in " ".join(
        DOCKERFILE.instructions("gpu", "RUN") + DOCKERFILE.instructions("build-gpu", "RUN")
    )


def image_uid() -> int:
    (uid,) = [arg.split("=", 1)[1] for arg in DOCKERFILE.instructions("runtime", "ARG") if arg.startswith("UID=")]
    return int(uid)


def test_dockerfile_runtime_is_the_default_small_non_root_target():
    assert list(DOCKERFILE.stages)[-1] == "runtime", "`docker build .` builds the CPU runtime"
    for target in ("runtime", "gpu"):
        # Runtime images copy the built venv; compilers and pip caches stay in the build stages.
        assert not any("pip install" in run for run in DOCKERFILE.instructions(target, "RUN")), target
        assert DOCKERFILE.instructions(target, "USER") == ["${UID}:${UID}"] and image_uid() != 0
        image_settings = {name for name in DOCKERFILE.env(target) if name.startswith("DYCE_")}
        assert image_settings <= settings_env_names(), target
    entrypoint = json.loads(DOCKERFILE.instructions("runtime", "ENTRYPOINT")[0])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["dyce-serve"] and scripts["dyce-serve"] == "service.__main__:main"


def test_dockerfile_installs_the_lock_with_the_pinned_torch_pair():
    constraints = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )  # fmt: skip
    assert constraints["torch"] == "2.14.0" and constraints["torchvision"] == "0.29.2"
    assert "onnxruntime-gpu" in constraints, "the GPU image's onnxruntime is pinned like the rest"
    installs = [run for stage in DOCKERFILE.stages for run in DOCKERFILE.instructions(stage, "RUN")]
    pip_installs = [part for run in installs for part in run.split("&&") if "pip install" in part]
    assert pip_installs
    for install in pip_installs:
        assert "-c constraints.txt" in install or "--no-deps" in install, install


def test_every_artifacts_source_is_a_stage_and_dockerignore_lets_through_what_is_copied():
    variants = {s.removeprefix("artifacts-") for s in DOCKERFILE.stages if s.startswith("artifacts-")}
    assert {"volume", "context", "build"} <= variants and DOCKERFILE.args["ARTIFACTS_FROM"] in variants
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    from dyce.artifacts import ArtifactLayout

    layout = ArtifactLayout("artifacts")
    served = {
        layout.backbone_manifest,
        layout.backbone_weights,
        layout.exits_manifest,
        layout.exits_weights,
        layout.bank,
    }
    assert {str(p) for p in served} <= allowed, "the files the service loads can be baked from the context"
    for stage in DOCKERFILE.stages:
        for copy in DOCKERFILE.instructions(stage, "COPY"):
            if "--from=" in copy:
                continue
            *sources, _ = shlex.split(copy)
            for source in (s.rstrip("/") for s in sources if not s.startswith("--")):
                # A directory gets through with the files re-included under it (Docker walks into it).
                passes = source in allowed or any(path.startswith(f"{source}/") for path in allowed)
                assert passes, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists() or source == "artifacts", source


def test_healthcheck_command_passes_on_a_ready_service_and_fails_without_one(live_server):
    (healthcheck,) = DOCKERFILE.instructions("runtime", "HEALTHCHECK")
    assert "--start-period" in healthcheck  # loading and warm-up are not failures
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python"
    command[0] = sys.executable  # the image's python; this test runs the same command with ours

    def probe(port: int) -> int:
        env = {"PATH": os.environ["PATH"], "DYCE_PORT": str(port)}
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    assert probe(live_server.port) == 0
    assert probe(free_port()) != 0
