#!/bin/bash
# Creates the `lesion` results database and its owner beside Airflow's metadata database.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE ROLE lesion LOGIN PASSWORD '${LESION_DB_PASSWORD}';
CREATE DATABASE lesion OWNER lesion;
SQL
