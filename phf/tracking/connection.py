"""The tracking store's connection: bounded requests, and an outage that never stops training.

MLflow retries a request to a dead server for minutes (7 retries with exponential backoff, a
120 s timeout each): a training loop that logs metrics would stall there, miss its checkpoints,
and lose the run. phf bounds every request (``tracking.request_timeout_s``,
``tracking.request_retries``), and when a request still fails because the server cannot be
reached, the ``Outage`` begins: one warning, and from then on nothing is sent (what would have
been is buffered by the Tracker) until a probe of the server's ``/health``, at most every
``tracking.probe_interval_s``, finds it back. No call on that path blocks on a dead server.
"""

from __future__ import annotations

import logging
import math
import os
import time
import urllib.error
import urllib.request

import requests
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class TrackingServerUnreachable(RuntimeError):
    """The configured tracking server does not answer; raised before any training starts."""


def is_http(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


def server_answers(uri: str, timeout_s: float) -> str | None:
    """None when ``uri``'s /health answers 200, else why not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


def check_tracking_server(uri: str | None, timeout_s: float) -> None:
    """Fail fast, before any work, when an http(s) tracking server is down."""
    if not is_http(uri):
        return
    reason = server_answers(uri, timeout_s)
    if reason is not None:
        raise TrackingServerUnreachable(
            f"cannot reach the MLflow tracking server at {uri} ({reason}). Start it, e.g. "
            "`mlflow server --host 127.0.0.1 --port 5000`, or drop tracking.uri to record runs "
            "in the local store ./mlflow.db"
        )


def bound_http_requests(tracking: DictConfig) -> None:
    """Bound MLflow's requests (read by MLflow at every request); a user's own MLFLOW_HTTP_*
    environment variables win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(tracking.request_timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(tracking.request_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` means "the server did not answer" (as opposed to a request it refused,
    which is a bug to raise): connection refused, timeouts, 5xx after the retries."""
    if isinstance(
        error,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            ConnectionError,
            TimeoutError,
            urllib.error.URLError,
        ),
    ):
        return True
    if isinstance(error, MlflowException):
        message = str(error.message)
        return message.startswith("API request to") and "failed with" in message
    return False


class Outage:
    """Whether the tracking server is down, and when to look again."""

    def __init__(self, uri: str, tracking: DictConfig) -> None:
        self.uri = uri
        self.probe_interval_s = float(tracking.probe_interval_s)
        self.timeout_s = float(tracking.request_timeout_s)
        self.since: float | None = None
        self.last_probe = 0.0
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def begin(self, error: BaseException) -> None:
        if self.down:
            return
        self.since = self.last_probe = time.monotonic()
        self.outages += 1
        log.warning(
            "the MLflow tracking server at %s does not answer (%s): training goes on; metrics "
            "are buffered and artifacts kept on disk until it is back (checked every %.0f s)",
            self.uri,
            str(error).splitlines()[0][:300],
            self.probe_interval_s,
        )

    def probe(self, force: bool = False) -> bool:
        """True when the server answers again (at most one probe per probe_interval_s unless
        ``force``); ends the outage."""
        if not self.down:
            return True
        now = time.monotonic()
        if not force and now - self.last_probe < self.probe_interval_s:
            return False
        self.last_probe = now
        if is_http(self.uri) and server_answers(self.uri, self.timeout_s) is not None:
            return False
        log.warning(
            "the MLflow tracking server at %s answers again after %.0f s: sending what was "
            "buffered",
            self.uri,
            now - self.since,
        )
        self.since = None
        return True
