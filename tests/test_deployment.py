"""What can be checked of the production stack without a Docker engine: the compose file parses,
carries the services the DAGs need, and agrees with the settings and the lock."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_compose_services_and_healthchecks():
    services = _compose()["services"]
    for name in ("postgres", "minio", "minio-init", "airflow-init", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer"):
        assert name in services, name
    for name in ("postgres", "minio", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert "healthcheck" in services[name], name
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_compose_wires_the_project_connections_and_no_secrets():
    text = (REPO / "docker-compose.yaml").read_text()
    env = _compose()["x-airflow-common"]["environment"]
    assert {"AIRFLOW_CONN_LESION_DB", "AIRFLOW_CONN_LESION_S3"} <= set(env)
    assert "lesion db upgrade" in text
    # every secret is a ${VAR} from .env, and .env.example names each one
    example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))  # $${X} is the container's own
    assert used <= example, used - example
    assert not re.search(r"PASSWORD: [^$\s]", text)


def test_dockerfile_uses_the_locked_airflow_version():
    lock = (REPO / "requirements.lock").read_text()
    airflow = re.search(r"^apache-airflow==(\S+)$", lock, re.M).group(1)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{airflow}-python3.11" in dockerfile
    assert "requirements.lock" in dockerfile


def test_workers_profile_and_remote_logging():
    compose = _compose()
    services = compose["services"]
    assert services["redis"]["profiles"] == ["workers"] and services["airflow-worker"]["profiles"] == ["workers"]
    assert services["airflow-worker"]["command"] == "celery worker" and "healthcheck" in services["airflow-worker"]
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"].startswith("${AIRFLOW_EXECUTOR")
    assert env["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "true" and env["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].startswith("s3://")
    assert "mc mb --ignore-existing local/airflow-logs" in services["minio-init"]["entrypoint"]
    assert "pools set lesion_tensorflow" in services["airflow-init"]["command"][1]


def test_lesion_env_names_match_the_settings():
    settings_src = (REPO / "lesion_tasks" / "settings.py").read_text() + (REPO / "lesion_tasks" / "backbones.py").read_text()
    known = set(re.findall(r'"(LESION_[A-Z0-9_]+)"', settings_src))
    used = set(re.findall(r"\b(LESION_[A-Z0-9_]+)\b", (REPO / "docker-compose.yaml").read_text() + (REPO / "docker" / "Dockerfile").read_text()))
    used -= {"LESION_DB_PASSWORD", "LESION_BUCKET"}  # .env values the compose file composes into URLs
    assert used <= known, used - known
    assert "ARG BAKE_RESNET101V2_WEIGHTS" in (REPO / "docker" / "Dockerfile").read_text()


def test_every_non_python_file_of_lesion_tasks_ships_in_the_image():
    """The image installs lesion_tasks non-editable: the review UI's templates and the migrations
    must be package data, or the API server's plugin fails on the first page."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lesion_tasks"]
    package = REPO / "lesion_tasks"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(d.startswith("templates/") for d in data)
    missing = [d for d in data if not any(fnmatch.fnmatch(d, pat) for pat in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
