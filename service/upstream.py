"""What both senders share about talking to an upstream: one pooled HTTP
session, and the adaptive window of calls in flight (SERVICE.md, "Delivery").

`Window` is plain arithmetic on numbers and times passed in; the delivery
loop (`service.outbox.delivery`) holds it under a lock and waits as it says.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies

from service.retry import congested, pause_seconds
from service.version import NAME, VERSION

# Multiplicative decrease: a congestion signal halves the window...
DECREASE = 0.5
# ... and each good answer adds 1/size, so a full window of good answers adds
# one call (additive increase, one step per round trip, as TCP does).
# Share of the health estimate one answer moves: about the last 20 answers count.
HEALTH_WEIGHT = 0.05
# The upstream answers well while at least this share of recent answers is good.
HEALTHY_SHARE = 0.5
# With a rate cap, hold no more work than can start within this long.
RATE_HORIZON_SECONDS = 2.0


def session(
    base_url: str, pool_size: int, headers: dict[str, str] | None = None
) -> requests.Session:
    """A Session with a connection for each call the window may keep in
    flight. It retries nothing itself: the outbox decides when to try again,
    with backoff and limits.

    The environment's proxy and CA bundle settings (HTTPS_PROXY, NO_PROXY,
    REQUESTS_CA_BUNDLE, ...) are read once, here, for `base_url`, rather than
    by requests on every call: reading them (and ~/.netrc) each time was a
    quarter of a call's CPU, taken from ingest in the same process."""
    made = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1), max_retries=0)
    made.mount("https://", adapter)
    made.mount("http://", adapter)
    made.trust_env = False
    made.proxies.update(get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        made.verify = bundle
    made.headers["User-Agent"] = f"{NAME}/{VERSION}"
    made.headers.update(headers or {})
    return made


def call(
    session: requests.Session,
    method: str,
    url: str,
    data: bytes,
    timeout: tuple[float, float],
) -> requests.Response:
    """One request on `session`, with its headers and auth, never following a
    redirect (it would turn a POST into a GET and drop the body); its answer
    is read whole.

    Sent through the session's transport adapter with the request's headers
    built once per method and URL: `session.request` merges the session's
    settings anew for every call, prepares the URL, cookies and auth again and
    keeps cookies between calls (an API client has no use for them), which
    together were a quarter of the CPU a delivered call costs, taken from
    the cores ingest runs on."""
    template = _template(session, method, url)
    prepared = requests.PreparedRequest()
    prepared.method, prepared.url, prepared.headers = method, template.url, template.headers.copy()
    prepared.prepare_body(data, None)
    verify = True if session.verify is None else session.verify
    response = session.get_adapter(url).send(
        prepared, timeout=timeout, verify=verify, cert=session.cert, proxies=session.proxies
    )
    response.content  # noqa: B018  (read now, so the connection goes back to the pool)
    return response


@functools.lru_cache(maxsize=64)
def _template(session: requests.Session, method: str, url: str) -> requests.PreparedRequest:
    return requests.Request(method, url, headers=session.headers, auth=session.auth).prepare()


@dataclass
class Window:
    """Calls in flight to one upstream from this process.

    - `size` shrinks by half on a congestion signal (no answer, 408, 429, 5xx)
      and grows by 1/size on any other answer, between 1 and `ceiling`. Only
      the first bad answer among calls started before the last cut cuts
      again, so a burst of failures in flight together halves it once.
    - A 429 or 503 with Retry-After pauses every call until then.
    - `interval` (1 / the rate cap) spaces the starts of calls.
    - `good_share` estimates how many recent answers were good, for the
      backoff bound (`healthy`).
    """

    ceiling: int
    interval: float = 0.0
    size: float = 0.0
    in_flight: int = 0
    paused_until: float = 0.0
    next_start: float = 0.0
    generation: int = 0
    good_share: float = 1.0

    def __post_init__(self) -> None:
        if self.ceiling < 1:
            raise ValueError("a window's ceiling is at least one call")
        self.size = self.size or float(self.ceiling)

    @classmethod
    def for_rate(cls, ceiling: int, per_second: float | None) -> Window:
        return cls(ceiling, interval=1.0 / per_second if per_second else 0.0)

    @property
    def limit(self) -> int:
        """Calls that may be in flight at once now."""
        return max(1, int(self.size))

    @property
    def healthy(self) -> bool:
        return self.good_share >= HEALTHY_SHARE

    def paused(self, now: float) -> bool:
        return self.paused_until > now

    def delay(self, now: float) -> float:
        """Seconds until the clock lets a call start (the pause, the rate cap);
        0 when it does now. A free slot is needed besides."""
        return max(self.paused_until - now, self.next_start - now, 0.0)

    def admits(self, now: float) -> bool:
        return self.in_flight < self.limit and self.delay(now) == 0

    def hold_limit(self) -> int | None:
        """With a rate cap, the most calls worth holding ready: what can start
        within RATE_HORIZON_SECONDS. None without a cap."""
        if not self.interval:
            return None
        return max(1, math.ceil(RATE_HORIZON_SECONDS / self.interval))

    def start(self, now: float) -> int:
        """Count a call as started; returns its ticket for `finish`."""
        self.in_flight += 1
        if self.interval:
            self.next_start = max(self.next_start, now) + self.interval
        return self.generation

    def finish(
        self, ticket: int, status: int | None, retry_after: float | None, now: float
    ) -> None:
        """A call has its answer (`status` None: none came)."""
        self.in_flight -= 1
        if congested(status):
            self.good_share -= HEALTH_WEIGHT * self.good_share
            if ticket == self.generation:
                self.size = max(1.0, self.size * DECREASE)
                self.generation += 1
        else:
            self.good_share += HEALTH_WEIGHT * (1.0 - self.good_share)
            self.size = min(float(self.ceiling), self.size + 1.0 / self.size)
        pause = pause_seconds(status, retry_after)
        if pause:
            self.paused_until = max(self.paused_until, now + pause)

    def abandon(self) -> None:
        """A call that ended without an answer to learn from (a bug in a sender)."""
        self.in_flight -= 1
