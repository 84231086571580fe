"""`[core] hostname_callable` of the Celery workers in tools/celery_cluster.py: two workers on
one machine share a host name, so each reports `<host>/<LESION_TEST_WORKER>` in its task instances."""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return f"{socket.getfqdn()}/{os.environ.get('LESION_TEST_WORKER', 'worker')}"
