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
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT/execution/}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$AIRFLOW_HOME/simple_auth_manager_passwords.json}"
export PATH="$REPO/.venv/bin:$PATH"
# Heartbeat, retry and Celery settings shared with docker-compose.yaml (defaults; the environment wins)
while IFS='=' read -r key value; do
  if [[ $key =~ ^AIRFLOW__[A-Z_]+$ ]] && [ -z "${!key:-}" ]; then export "$key=$value"; fi
done < "$REPO/docker/airflow-workers.env"
