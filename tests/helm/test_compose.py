"""deploy/compose.yaml and deploy/Dockerfile, checked without a container engine: the compose
services' commands parse with the services' real CLIs and point at each other, and the
Dockerfile copies what the package needs."""

from __future__ import annotations

import re
import tomllib

import yaml

from gateway.settings import GatewaySettings
from services.scheduler.server import SchedulerSettings
from services.worker.settings import WorkerSettings
from tests.helm.chart import ROOT, _UniqueKeyLoader

COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PARSERS = {"gateway": GatewaySettings, "scheduler": SchedulerSettings, "worker": WorkerSettings}


def interpolate(value, env: dict[str, str]):
    """Compose's ${NAME:-default} / ${NAME} substitution, applied through the whole file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}",
                      lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    return value


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.load(COMPOSE.read_text(), Loader=_UniqueKeyLoader), env or {})


def settings(services: dict, name: str):
    command = services[name]["command"]
    assert command[0] == name
    return PARSERS[name].from_args(command[1:])


def test_compose_services_parse_and_point_at_each_other():
    services = compose()["services"]
    assert set(services) == {"redis", "worker", "scheduler", "gateway"}
    worker, scheduler, gateway = (settings(services, n) for n in ("worker", "scheduler", "gateway"))
    assert (worker.tp_size, worker.pp_size, worker.device, worker.host) == (1, 1, "cpu", "0.0.0.0")
    assert scheduler.workers == (f"worker:{worker.port}",)
    assert scheduler.advertise_host == "scheduler" and scheduler.host == "0.0.0.0"
    assert scheduler.redis_url == gateway.redis_url == "redis://redis:6379/0"
    assert gateway.host == "0.0.0.0"
    assert services["gateway"]["ports"] == [f"50051:{gateway.port}"]
    assert worker.model == gateway.model == ""  # the built-in model, made in the shared /cache
    health = " ".join(services["worker"]["healthcheck"]["test"])
    assert f"/dev/tcp/127.0.0.1/{worker.port}" in health
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services and "healthcheck" in services[dependency], name
    for name in PARSERS:
        assert services[name]["image"] == "meshserve:0.1.0"
        assert services[name]["environment"]["MESHSERVE_CACHE"] == "/cache"
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (COMPOSE.parent / ".." / services[name]["build"]["dockerfile"]).is_file()


def test_compose_environment_picks_model_keys_and_port(monkeypatch):
    env = {"MESHSERVE_MODEL": "/models/m", "MESHSERVE_MODELS": "/srv/models",
           "MESHSERVE_API_KEYS": "k1,k2", "MESHSERVE_PORT": "6000"}
    services = compose(env)["services"]
    assert settings(services, "worker").model == settings(services, "gateway").model == "/models/m"
    assert "/srv/models:/models:ro" in services["worker"]["volumes"]
    assert services["gateway"]["ports"] == ["6000:50051"]
    monkeypatch.setenv("MESHSERVE_API_KEYS", services["gateway"]["environment"]["MESHSERVE_API_KEYS"])
    assert settings(services, "gateway").api_keys == ("k1", "k2")
    assert "models:/models:ro" in compose()["services"]["gateway"]["volumes"]  # named volume


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_copies_the_package_and_runs_meshserve():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    instructions = dockerfile_instructions()
    copied = set()
    for op, rest in instructions:
        if op == "COPY":
            *sources, _ = rest.split()
            copied |= set(sources)
    for source in copied:
        assert (ROOT / source).exists(), source
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    # top-level packages found under "." and under "protos"
    assert {"gateway", "services", "deploy", "protos", "pyproject.toml", pyproject["project"]["readme"]} \
        <= copied
    assert packages - {"meshserve"} <= copied  # meshserve.* lives under protos/
    assert ("ENTRYPOINT", '["meshserve"]') in instructions
    assert "meshserve" in pyproject["project"]["scripts"]
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args["EXTRAS"] in pyproject["project"]["optional-dependencies"]
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    setup = (ROOT / "deploy" / "setup.sh").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in setup  # the CPU torch that setup.sh installs

