# Sourced by `make airflow` and tools/airflow_demo.py's callers: a private Airflow on the embedded
# defaults, with the project's DAGs and plugins. Every value can be overridden from the environment.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LESION_HOME="${LESION_HOME:-$HOME/.lesion}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$LESION_HOME/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$REPO/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="${AIRFLOW__CORE__PLUGINS_FOLDER:-$REPO/plugins}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}"
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
# The worker's and the triggerer's log servers follow the API port (8080 -> Airflow's own 8793 and 8794), so two
# `make airflow` on one machine with different AIRFLOW__API__PORT do not fight over them (the environment wins)
_log_base=$(( AIRFLOW__API__PORT + 714 <= 65535 ? AIRFLOW__API__PORT + 713 : AIRFLOW__API__PORT - 1000 ))
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT="${AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT:-$_log_base}"
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT="${AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT:-$((_log_base + 1))}"
unset _log_base
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT/execution/}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$AIRFLOW_HOME/simple_auth_manager_passwords.json}"
export PATH="$REPO/.venv/bin:$PATH"
# Sized to this machine (defaults only; the environment wins). The LocalExecutor forks all of
# [core] parallelism's workers at start (32 by default: 32 idle processes on a 2-core laptop); TensorFlow
# tasks run one at a time anyway (pool lesion_tensorflow), the rest are light: 2 per core, 4 to 32.
NCPU="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-$(( NCPU <= 2 ? 4 : (NCPU >= 16 ? 32 : NCPU * 2) ))}"
# one API server worker per 4 cores (1 to 4), one DAG-parsing process per 4 cores (1 to 2): three DAG files
export AIRFLOW__API__WORKERS="${AIRFLOW__API__WORKERS:-$(( NCPU >= 16 ? 4 : (NCPU >= 4 ? NCPU / 4 : 1) ))}"
export AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="${AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES:-$(( NCPU >= 8 ? 2 : 1 ))}"
unset NCPU
# TensorFlow's C++ start-up lines (cpu_feature_guard ...) would be red ERROR lines in every task log:
# warnings and errors only (unless set). The tasks also filter the oneDNN notice (plugins/lesion_airflow.py).
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Heartbeat, retry and Celery settings shared with docker-compose.yaml (defaults; the environment wins)
while IFS='=' read -r key value; do
  if [[ $key =~ ^AIRFLOW__[A-Z_]+$ ]] && [ -z "${!key:-}" ]; then export "$key=$value"; fi
done < "$REPO/docker/airflow-workers.env"
