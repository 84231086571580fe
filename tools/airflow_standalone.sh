#!/usr/bin/env bash
# `make airflow`: a real Airflow 3 on 127.0.0.1 with the project's DAGs and the embedded defaults
# (SQLite + local store under LESION_HOME). Ctrl-C (or `kill -INT` of its PID) stops everything: the
# SIGINT reaches the standalone leader, which stops its api-server, scheduler, dag-processor and
# triggerer, also when this was started with SIGINT ignored (see the exec at the end).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
mkdir -p "$AIRFLOW_HOME"
echo "Airflow home: $AIRFLOW_HOME   lesion home: $LESION_HOME"
lesion db upgrade
airflow db migrate >/dev/null
# one TensorFlow task at a time: a TF process holds all cores of this machine
airflow pools set lesion_tensorflow 1 "TensorFlow tasks (train, evaluate, score)" >/dev/null
echo "UI: http://${AIRFLOW__API__HOST}:${AIRFLOW__API__PORT}  (user and password: see $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE)"
echo "Drop ISIC folders or .zip files under $LESION_HOME/store/incoming/ and trigger isic_ingest, then lesion_retrain."
# Started from a background job (`make airflow &`, nohup, some CI runners), this script inherits SIGINT
# *ignored*; the ignore survives exec (and `trap - INT` cannot undo it in a non-interactive shell), and
# Python then never installs its KeyboardInterrupt handler, so Ctrl-C / `kill -INT` would not stop
# Airflow. Reset SIGINT to its default, then exec `airflow standalone` (same PID, nothing in between).
exec python -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    airflow standalone
