"""Airflow plugin: the lesion review UI, mounted in the API server at /lesion-review and listed in
Airflow's navigation as "Lesion review".

Only wiring: the app is `lesion_tasks.review.web`; this file hands it Airflow's login (the JWT the
Airflow UI keeps in its `_token` cookie, or a bearer token) and Airflow's permissions: reading needs
read access to the `lesion_nightly_score` DAG, recording verdicts edit access to `lesion_retrain`
(verdicts become its training data). Settings come from the Connections lesion_db / lesion_s3.
"""

from __future__ import annotations

import logging

from airflow.plugins_manager import AirflowPlugin
from fastapi import Request

from lesion_tasks.review.web import Reviewer, create_app

log = logging.getLogger(__name__)

PREFIX = "/lesion-review"


async def _reviewer(request: Request) -> Reviewer | None:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    if not token:
        return None
    manager = get_auth_manager()
    try:
        user = await manager.get_user_from_token(token)
    except Exception as exc:  # noqa: BLE001 - expired, revoked or forged: not logged in
        log.info("lesion review: token refused (%s)", type(exc).__name__)
        return None
    return Reviewer(
        name=user.get_name(),
        can_view=manager.is_authorized_dag(method="GET", details=DagDetails(id="lesion_nightly_score"), user=user),
        can_review=manager.is_authorized_dag(method="PUT", details=DagDetails(id="lesion_retrain"), user=user),
    )


def _login_url(next_url: str) -> str:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().get_url_login(next_url=next_url)


def _settings():
    from lesion_airflow import lesion_settings

    return lesion_settings()


class LesionReviewPlugin(AirflowPlugin):
    name = "lesion_review"
    fastapi_apps = [{"app": create_app(_settings, _reviewer, _login_url), "url_prefix": PREFIX, "name": "Lesion review"}]
    external_views = [{"name": "Lesion review", "href": "lesion-review/", "destination": "nav",
                       "url_route": "lesion-review", "category": "browse"}]
