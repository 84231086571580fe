#!/bin/sh
# Refuses to let the stack start on weak or placeholder secrets. The first service of docker-compose.yaml
# (postgres and minio wait for it, everything else waits for them): it exits 1, naming each bad
# variable (never its value), while a secret is empty, still a `change-me` placeholder from
# .env.example, shorter than 16 characters or outside the URL-safe alphabet (the secrets are written
# into URLs, JSON Connections and SQL), or while the MinIO users are not three distinct accounts.
#   python -c "import secrets; print(secrets.token_urlsafe(32))"     # a secret
#   python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"  # AIRFLOW_FERNET_KEY
SECRETS="POSTGRES_PASSWORD LESION_DB_PASSWORD MINIO_ROOT_PASSWORD MINIO_APP_PASSWORD MINIO_LOGS_PASSWORD
AIRFLOW_SECRET_KEY AIRFLOW_JWT_SECRET AIRFLOW_FERNET_KEY REDIS_PASSWORD"
USERS="MINIO_ROOT_USER MINIO_APP_USER MINIO_LOGS_USER"
failed=0

refuse() {
    echo "check-secrets: $1 $2 (set it in .env; see .env.example)" >&2
    failed=1
}

for name in $SECRETS; do
    eval "value=\${$name:-}"
    case "$value" in
        "") refuse "$name" "is empty"; continue ;;
        [Cc][Hh][Aa][Nn][Gg][Ee][-_][Mm][Ee]*) refuse "$name" "is still a change-me placeholder"; continue ;;
    esac
    if [ "$name" = AIRFLOW_FERNET_KEY ]; then
        case "$value" in
            *[!A-Za-z0-9_=-]*) refuse "$name" "is not a Fernet key (32 url-safe base64-encoded bytes)" ;;
            *=) [ "${#value}" -eq 44 ] || refuse "$name" "is not a Fernet key (32 url-safe base64-encoded bytes)" ;;
            *) refuse "$name" "is not a Fernet key (32 url-safe base64-encoded bytes)" ;;
        esac
        continue
    fi
    case "$value" in
        *[!A-Za-z0-9._~-]*) refuse "$name" "has characters outside A-Z a-z 0-9 . _ ~ -" ;;
    esac
    [ "${#value}" -ge 16 ] || refuse "$name" "is shorter than 16 characters"
done

for name in $USERS; do
    eval "value=\${$name:-}"
    case "$value" in
        "") refuse "$name" "is empty" ;;
        *[!A-Za-z0-9._-]*) refuse "$name" "has characters outside A-Z a-z 0-9 . _ -" ;;
    esac
done
if [ "${MINIO_APP_USER:-}" = "${MINIO_ROOT_USER:-}" ] || [ "${MINIO_LOGS_USER:-}" = "${MINIO_ROOT_USER:-}" ] ||
   [ "${MINIO_APP_USER:-}" = "${MINIO_LOGS_USER:-}" ]; then
    refuse "MINIO_ROOT_USER, MINIO_APP_USER and MINIO_LOGS_USER" "must be three different users"
fi
if [ "${MINIO_APP_PASSWORD:-}" = "${MINIO_ROOT_PASSWORD:-}" ] || [ "${MINIO_LOGS_PASSWORD:-}" = "${MINIO_ROOT_PASSWORD:-}" ] ||
   [ "${MINIO_APP_PASSWORD:-}" = "${MINIO_LOGS_PASSWORD:-}" ]; then
    refuse "MINIO_ROOT_PASSWORD, MINIO_APP_PASSWORD and MINIO_LOGS_PASSWORD" "must be three different secrets"
fi

[ "$failed" -eq 0 ] || exit 1
echo "check-secrets: ok"
