#!/bin/sh
# MinIO's one-shot init (image minio/mc): the buckets, and one least-privilege user per client. The root
# account is used here only; re-running is harmless (buckets kept, policies and secrets brought up to date).
#   MINIO_APP_USER   objects of $LESION_BUCKET: read, write, delete (the lesion_s3 Connection: tasks, review UI)
#   MINIO_LOGS_USER  objects of airflow-logs: read, write (the minio_logs Connection: remote task logs)
# Each may also list its own bucket and nothing else: no other bucket, no bucket creation, no admin API.
set -eu
LOGS_BUCKET=airflow-logs
case "$LESION_BUCKET" in
    *[!a-z0-9.-]*|"") echo "minio-init: LESION_BUCKET=$LESION_BUCKET is not a bucket name" >&2; exit 1 ;;
esac
# credentials from the environment, not the command line (check-secrets allows URL-safe characters only)
export MC_HOST_local="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@minio:9000"

mc mb --ignore-existing "local/$LESION_BUCKET"
mc mb --ignore-existing "local/$LOGS_BUCKET"

policy() {  # policy NAME BUCKET ACTION...: list BUCKET, and the ACTIONs on its objects
    name=$1 bucket=$2
    shift 2
    actions=$(printf '"s3:%s", ' "$@")
    # printf is a shell builtin: the mc image is minimal
    printf '{"Version": "2012-10-17", "Statement": [%s, %s]}\n' \
        "{\"Effect\": \"Allow\", \"Action\": [\"s3:GetBucketLocation\", \"s3:ListBucket\"], \"Resource\": [\"arn:aws:s3:::$bucket\"]}" \
        "{\"Effect\": \"Allow\", \"Action\": [${actions%, }], \"Resource\": [\"arn:aws:s3:::$bucket/*\"]}" >"${TMPDIR:-/tmp}/$name.json"
    mc admin policy create local "$name" "${TMPDIR:-/tmp}/$name.json"
}

user() {  # user NAME SECRET POLICY
    mc admin user add local "$1" "$2"
    # attach fails on older servers when the policy is attached already
    mc admin policy attach local "$3" --user "$1" || case "$(mc admin user info local "$1")" in
        *"$3"*) echo "minio-init: $3 already attached to $1" ;;
        *) exit 1 ;;
    esac
}

policy lesion-app "$LESION_BUCKET" GetObject PutObject DeleteObject
policy lesion-logs "$LOGS_BUCKET" GetObject PutObject
user "$MINIO_APP_USER" "$MINIO_APP_PASSWORD" lesion-app
user "$MINIO_LOGS_USER" "$MINIO_LOGS_PASSWORD" lesion-logs
echo "minio-init: buckets $LESION_BUCKET and $LOGS_BUCKET; users $MINIO_APP_USER (lesion-app), $MINIO_LOGS_USER (lesion-logs)"
