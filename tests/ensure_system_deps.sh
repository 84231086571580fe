#!/usr/bin/env bash
# Makes sure a PostgreSQL server binary is installed; the tests start their own throwaway cluster.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "PostgreSQL not found: installing it with apt-get (needed by the integration tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  exit 0
fi
echo "PostgreSQL is not installed and cannot be installed automatically (not root or no apt-get)." >&2
echo "Install it (e.g. 'sudo apt-get install postgresql') or set LESION_TEST_PG_URL to a server you own." >&2
if [ "${CI:-}" = "true" ]; then exit 1; fi
