"""A WSGI app that answers with the generation ``offloadctl reuseport exec``
started it as (``$OFFLOADCTL_REUSEPORT_GENERATION``): what gunicorn serves in
the exec tests, the bench and the demo::

    offloadctl reuseport exec --name web --listen 0.0.0.0:8080 -- \
        gunicorn --workers 2 --chdir examples wsgi_generation:app
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

GENERATION = os.environ.get("OFFLOADCTL_REUSEPORT_GENERATION", "0")
# A little work per request, so that requests queue on the listeners under load.
DELAY = float(os.environ.get("WSGI_DELAY_MS", "0")) / 1000


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    time.sleep(DELAY)
    body = f"{GENERATION}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
