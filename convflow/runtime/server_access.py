"""Whether this process can use the Prefect server it is set to use: PREFECT_API_URL, the server's
basic auth, a connection lost mid-run. Asked before a command writes anything, instead of a
traceback mid-run."""

from __future__ import annotations

import httpx
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings


def api_url() -> str | None:
    """PREFECT_API_URL, from the environment or the active Prefect profile; None when unset or empty."""
    return get_current_settings().api.url or None


def auth_refusal() -> str | None:
    """Why the Prefect server at PREFECT_API_URL refuses this process's requests (basic auth), in one
    line, or None; None also without PREFECT_API_URL (a temporary server), and when the server cannot
    be reached: that is no refusal, and the caller meets it where it happens."""
    settings = get_current_settings().api
    if not settings.url:
        return None
    try:
        with get_client(sync_client=True) as client:
            client.hello()  # authenticated, unlike /health
    except httpx.TransportError:
        return None
    except httpx.HTTPStatusError as error:
        if error.response.status_code == 401:
            return _unauthorized(settings.url, has_auth_string=settings.auth_string is not None)
    return None


def _unauthorized(url: str, has_auth_string: bool) -> str:
    if not has_auth_string:
        return (
            f"the Prefect server at {url} requires basic auth (401 Unauthorized); "
            "set PREFECT_API_AUTH_STRING=USER:PASSWORD, the server's PREFECT_SERVER_API_AUTH_STRING"
        )
    return (
        f"the Prefect server at {url} refused PREFECT_API_AUTH_STRING "
        "(401 Unauthorized); set it to the server's PREFECT_SERVER_API_AUTH_STRING (USER:PASSWORD)"
    )


def is_lost_connection(error: BaseException) -> bool:
    """Whether `error` (or the error it was raised from) is a connection to the server that failed."""
    return isinstance(error, httpx.TransportError) or isinstance(error.__cause__, httpx.TransportError)
