"""What can be checked of the production stack without a Docker engine: the compose file parses,
carries the services the DAGs need, and agrees with the settings and the lock."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import reliability

REPO = Path(__file__).resolve().parents[2]


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
    # the broker asks for the password the workers send
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    assert '--requirepass "$$REDISCLI_AUTH"' in services["redis"]["command"][-1]
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert env["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "true" and env["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].startswith("s3://")
    assert "/docker/minio-init.sh" in services["minio-init"]["entrypoint"]
    assert 'mc mb --ignore-existing "local/$LOGS_BUCKET"' in (REPO / "docker" / "minio-init.sh").read_text()
    assert "pools set lesion_tensorflow" in services["airflow-init"]["command"][1]


def test_every_airflow_service_reads_the_settings_the_celery_test_proved():
    """docker/airflow-workers.env is the one source of the Celery, heartbeat and retry settings: every
    Airflow service of the compose file reads it, and the live Celery test starts its workers with it."""
    services = _compose()["services"]
    airflow_services = {n for n, s in services.items() if str(s.get("image", "")).startswith("lesion-airflow")}
    assert {"airflow-scheduler", "airflow-worker", "airflow-apiserver"} <= airflow_services
    for name in airflow_services:
        assert services[name]["env_file"] == ["docker/airflow-workers.env"], name
    settings = dict(line.split("=", 1) for line in (REPO / "docker" / "airflow-workers.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert settings["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    assert int(settings["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]) <= 60
    assert "test_celery_workers.py" in (REPO / "docker" / "airflow-workers.env").read_text()
    assert (REPO / "tests" / "live" / "test_celery_workers.py").exists()


def test_lesion_env_names_match_the_settings():
    settings_src = (REPO / "lesion_tasks" / "core" / "settings.py").read_text() + (REPO / "lesion_tasks" / "model" / "backbones.py").read_text()
    known = set(re.findall(r'"(LESION_[A-Z0-9_]+)"', settings_src))
    used = set(re.findall(r"\b(LESION_[A-Z0-9_]+)\b", (REPO / "docker-compose.yaml").read_text() + (REPO / "docker" / "Dockerfile").read_text()))
    used -= {"LESION_DB_PASSWORD", "LESION_BUCKET"}  # .env values the compose file composes into URLs
    used -= {"LESION_TF_POOL_SLOTS"}  # read by airflow-init's `airflow pools set`, not by the package
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
    assert any(d.startswith("review/templates/") for d in data)
    missing = [d for d in data if not any(fnmatch.fnmatch(d, pat) for pat in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


# --- secrets and least privilege (static: no Docker engine here) ---------------------------------------

SECRETS = ("POSTGRES_PASSWORD", "LESION_DB_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_APP_PASSWORD", "MINIO_LOGS_PASSWORD",
           "AIRFLOW_SECRET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "REDIS_PASSWORD")
MINIO_USERS = ("MINIO_ROOT_USER", "MINIO_APP_USER", "MINIO_LOGS_USER")
AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker")


def _example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _depends(services: dict, name: str) -> set[str]:
    """Every service `name` waits for, directly or not."""
    seen, todo = set(), [name]
    while todo:
        for dep in services[todo.pop()].get("depends_on", {}):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_secret_is_required_where_it_is_used():
    """`${VAR:?...}`: compose refuses to start while a secret is unset or empty (a blank Fernet key
    would store Connections unencrypted)."""
    text = (REPO / "docker-compose.yaml").read_text()
    for name in SECRETS + MINIO_USERS[1:]:
        uses = re.findall(r"(?<!\$)\$\{" + name + r"((?:[:?+-][^}]*)?)\}", text)
        assert uses, f"{name} is not used"
        assert all(u.startswith(":?") for u in uses), f"{name}: every use must be ${{{name}:?...}}, found {uses}"
    compose = _compose()
    for name, service in [("x-airflow-common", compose["x-airflow-common"]), *compose["services"].items()]:
        # .env is for interpolation, no container gets every secret; the one env_file holds no secret
        assert service.get("env_file", []) in ([], ["docker/airflow-workers.env"]), name
    shared = (REPO / "docker" / "airflow-workers.env").read_text()
    assert not re.search(r"^[^#]*(PASSWORD|SECRET|_KEY|_CONN_)", shared, re.M), shared


def test_one_jwt_secret_fernet_key_and_api_secret_for_every_airflow_component():
    services = _compose()["services"]
    expected = [("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_JWT_SECRET"), ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_FERNET_KEY"),
                ("AIRFLOW__API__SECRET_KEY", "AIRFLOW_SECRET_KEY")]
    for service in AIRFLOW_SERVICES:
        env = services[service]["environment"]
        for setting, variable in expected:
            assert env[setting].startswith("${" + variable + ":?"), (service, setting, env.get(setting))


def test_check_secrets_runs_before_anything_else():
    services = _compose()["services"]
    check = services["check-secrets"]
    assert set(SECRETS) | set(MINIO_USERS) <= set(check["environment"])
    assert "/docker/check-secrets.sh" in check["entrypoint"] and "restart" not in check
    for name in ("postgres", "minio"):  # before any data volume is initialised with a weak password
        assert services[name]["depends_on"]["check-secrets"]["condition"] == "service_completed_successfully"
    for name in services:
        if name != "check-secrets":
            assert "check-secrets" in _depends(services, name), f"{name} can start without check-secrets"


def test_minio_root_credentials_stay_in_minio_and_its_init():
    services = _compose()["services"]
    for name, service in services.items():
        mentions = json.dumps(service.get("environment", {})) + json.dumps(service.get("command", "")) + \
            json.dumps(service.get("entrypoint", ""))
        if name not in ("minio", "minio-init", "check-secrets"):
            assert "MINIO_ROOT" not in mentions, f"{name} gets MinIO's root credentials"
    env = _compose()["x-airflow-common"]["environment"]
    app, logs = json.loads(env["AIRFLOW_CONN_LESION_S3"]), json.loads(env["AIRFLOW_CONN_MINIO_LOGS"])
    assert app["login"].startswith("${MINIO_APP_USER:?") and app["password"].startswith("${MINIO_APP_PASSWORD:?")
    assert logs["login"].startswith("${MINIO_LOGS_USER:?") and logs["password"].startswith("${MINIO_LOGS_PASSWORD:?")
    assert env["AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID"] == "minio_logs"
    assert env["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"] == "s3://airflow-logs"


def test_env_example_never_passes_as_it_is():
    example = _example()
    assert set(SECRETS) | set(MINIO_USERS) <= set(example)
    for name in SECRETS:
        assert example[name] == "" or example[name].startswith("change-me"), name
    assert len({example[n] for n in MINIO_USERS}) == 3


def _good_env() -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {name: secrets.token_urlsafe(24) for name in SECRETS}
    env["AIRFLOW_FERNET_KEY"] = Fernet.generate_key().decode()
    env.update(MINIO_ROOT_USER="admin-x", MINIO_APP_USER="lesion-app", MINIO_LOGS_USER="airflow-logs")
    return env


def _check(env: dict[str, str]) -> subprocess.CompletedProcess:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh")
    return subprocess.run([sh, str(REPO / "docker" / "check-secrets.sh")], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30)


def test_check_secrets_refuses_the_example_and_weak_values():
    good = _good_env()
    ok = _check(good)
    assert ok.returncode == 0, ok.stderr
    example = {k: v for k, v in _example().items() if k in set(SECRETS) | set(MINIO_USERS)}
    refused = _check(example)
    assert refused.returncode == 1
    for name in SECRETS:
        assert f"check-secrets: {name} is" in refused.stderr, name
    assert "change-me" not in refused.stderr.replace("is still a change-me placeholder", "")  # names, never values
    cases = {"AIRFLOW_JWT_SECRET": ("CHANGE-ME-please-0123456789", "change-me placeholder"),
             "POSTGRES_PASSWORD": ("x1y2z3", "shorter than 16"),
             "LESION_DB_PASSWORD": ("quote'in-the-password-0123", "characters outside"),
             "AIRFLOW_FERNET_KEY": ("not-a-fernet-key-0123456789", "not a Fernet key"),
             "MINIO_APP_USER": (good["MINIO_ROOT_USER"], "three different users"),
             "MINIO_LOGS_PASSWORD": (good["MINIO_ROOT_PASSWORD"], "three different secrets")}
    for name, (value, message) in cases.items():
        result = _check({**good, name: value})
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr)
        assert value not in result.stderr
    reliability.record("Compose started with example or weak secrets", "docker/check-secrets.sh on .env.example "
                       "values, change-me, short, reused, invalid Fernet", "the stack refuses to start, naming the variable",
                       f"exit 1 for all {len(cases) + 1} cases; values never printed", 0, 0)


def test_minio_init_makes_least_privilege_users(tmp_path):
    """docker/minio-init.sh against a stand-in `mc` that records its calls: one user per client, each
    with a policy on its own bucket only."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mc").write_text('#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
                             'if [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" "$MC_POLICIES/$5.json"; fi\n')
    (fake / "mc").chmod(0o755)
    (tmp_path / "policies").mkdir()
    env = {**_good_env(), "LESION_BUCKET": "lesion", "PATH": f"{fake}:{os.environ['PATH']}",
           "MC_LOG": str(tmp_path / "calls"), "MC_POLICIES": str(tmp_path / "policies"), "TMPDIR": str(tmp_path)}
    result = subprocess.run([sh, str(REPO / "docker" / "minio-init.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[:2] == ["mb --ignore-existing local/lesion", "mb --ignore-existing local/airflow-logs"]
    assert f"admin user add local lesion-app {env['MINIO_APP_PASSWORD']}" in calls
    assert f"admin user add local airflow-logs {env['MINIO_LOGS_PASSWORD']}" in calls
    assert "admin policy attach local lesion-app --user lesion-app" in calls
    assert "admin policy attach local lesion-logs --user airflow-logs" in calls
    assert env["MINIO_ROOT_PASSWORD"] not in "\n".join(calls)  # the root secret is never an argument

    def grants(policy: str) -> dict[str, set[str]]:
        doc = json.loads((tmp_path / "policies" / f"{policy}.json").read_text())
        out: dict[str, set[str]] = {}
        for statement in doc["Statement"]:
            assert statement["Effect"] == "Allow"
            for resource in statement["Resource"]:
                out.setdefault(resource, set()).update(statement["Action"])
        return out

    bucket = {"s3:GetBucketLocation", "s3:ListBucket"}
    assert grants("lesion-app") == {"arn:aws:s3:::lesion": bucket,
                                    "arn:aws:s3:::lesion/*": {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}}
    assert grants("lesion-logs") == {"arn:aws:s3:::airflow-logs": bucket,
                                     "arn:aws:s3:::airflow-logs/*": {"s3:GetObject", "s3:PutObject"}}


def test_task_log_file_names_stay_bounded_for_long_run_ids(monkeypatch):
    """A 260-character run id made every task fail with no log ("File name too long") under Airflow's
    default log_filename_template: the shipped one (compose and `make airflow` read airflow-workers.env)
    keeps each path segment under the file system's 255 bytes, and is Airflow's default for ordinary ids."""
    from types import SimpleNamespace

    from airflow.configuration import conf
    from airflow.utils.helpers import parse_template_string

    settings = dict(line.split("=", 1) for line in (REPO / "docker" / "airflow-workers.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    shipped = settings["AIRFLOW__LOGGING__LOG_FILENAME_TEMPLATE"]
    monkeypatch.setenv("AIRFLOW__LOGGING__LOG_FILENAME_TEMPLATE", shipped)
    assert conf.get("logging", "log_filename_template") == shipped  # read as written, no interpolation

    def render(template: str, run_id: str, map_index: int = -1) -> str:
        ti = SimpleNamespace(dag_id="lesion_nightly_score", task_id="score_shard", run_id=run_id, map_index=map_index,
                             try_number=1)
        return parse_template_string(template)[1].render(ti=ti, try_number=1)

    default = conf.get_default_value("logging", "log_filename_template").replace("%%", "%")
    for run_id in ("manual__2026-12-02T10:00:00+00:00", "r" * 200):
        for map_index in (-1, 3):
            assert render(shipped, run_id, map_index) == render(default, run_id, map_index)
    long_a, long_b = "a" * 260, "a" * 250
    assert max(len(seg.encode()) for seg in render(default, long_a).split("/")) > 255  # what failed
    for run_id in (long_a, long_b):
        assert max(len(seg.encode()) for seg in render(shipped, run_id).split("/")) <= 255
    assert render(shipped, long_a) != render(shipped, long_b)
    reliability.record("A 260-character run id", "log_filename_template rendered for run ids of 260 and 250 "
                       "characters (Airflow's default: a 267-byte path segment)", "every segment under 255 bytes; "
                       "ordinary ids keep Airflow's default paths", "longest segment 212 bytes; distinct paths", 0, 0)


def test_make_airflow_stop_sends_one_sigint_to_the_supervisor(tmp_path):
    """`make airflow &` leaves make ignoring SIGINT (the shell started it so) and make passes none on, so `kill -INT`
    of make's PID did nothing. The supervisor writes its PID under AIRFLOW_HOME and `make airflow-stop` sends it the
    one SIGINT (here to a stand-in that records the signals it gets); without a running one it says so."""
    import signal
    import sys

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    missing = subprocess.run(["make", "-s", "airflow-stop"], cwd=REPO, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "no make airflow running" in missing.stderr
    got = tmp_path / "signals"
    stand_in = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, lambda s, f: (open(sys.argv[1], 'a').write(f'{s}\\n'), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"), str(got)], stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as under `make airflow &` ...
    try:
        assert stand_in.stdout.readline().strip() == "ready"  # ... and its handler installed over the ignore
        (tmp_path / "lesion-airflow.pid").write_text(f"{stand_in.pid}\n")
        sent = subprocess.run(["make", "-s", "airflow-stop"], cwd=REPO, env=env, capture_output=True, text=True)
        assert sent.returncode == 0 and f"SIGINT sent to {stand_in.pid}" in sent.stdout, sent.stderr
        assert stand_in.wait(30) == 0 and got.read_text().split() == [str(int(signal.SIGINT))]
    finally:
        stand_in.kill()
