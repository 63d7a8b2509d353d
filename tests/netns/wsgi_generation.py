"""The WSGI app gunicorn serves in the ``reuseport exec`` tests: it answers with
the generation ``offloadctl reuseport exec`` started it as."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

GENERATION = os.environ.get("OFFLOADCTL_REUSEPORT_GENERATION", "0")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = f"{GENERATION}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
