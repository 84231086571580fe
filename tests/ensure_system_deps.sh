#!/usr/bin/env bash
# Installs the system packages the suite needs when they are missing: PostgreSQL server binaries
# (the tests start their own throwaway cluster), redis-server (the Celery broker of the workers test),
# the sqlite3 shell (the backup drill's documented `.backup`) and Debian's Chromium (the review UI's
# browser tests drive it with Playwright; nothing is downloaded at test time).
set -euo pipefail
missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
  missing+=(postgresql)
fi
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
  missing+=(redis-server)
fi
if ! command -v sqlite3 >/dev/null; then
  missing+=(sqlite3)
fi
if ! command -v chromium >/dev/null && [ -z "${LESION_CHROMIUM:-}" ]; then
  missing+=(chromium)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "Installing ${missing[*]} with apt-get (needed by the integration and browser tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "Missing system packages: ${missing[*]}; they cannot be installed automatically (not root or no apt-get)." >&2
echo "Install them (e.g. 'sudo apt-get install ${missing[*]}'), or point LESION_TEST_PG_URL at a PostgreSQL" >&2
echo "server you own and LESION_CHROMIUM at a Chromium binary." >&2
if [ "${CI:-}" = "true" ]; then exit 1; fi
