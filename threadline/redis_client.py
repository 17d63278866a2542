"""The one way threadline connects to Redis: clients that ride out a Redis restart.

`redis.asyncio.from_url(url)` alone retries nothing (redis-py 8), so after a
restart even the first command on each pooled connection fails. Every client
built here retries connection errors and timeouts with jittered exponential
backoff for a few seconds, which covers a restart or a failover, and checks a
pooled connection that sat idle before using it.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

__all__ = ["RETRY_WINDOW_S", "connect_redis"]

#: Retries after the first attempt, and the backoff between them: together about
#: RETRY_WINDOW_S of trying before a command gives up.
_RETRIES = 12
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 1.0
RETRY_WINDOW_S = sum(min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**i) for i in range(_RETRIES))
_CONNECT_TIMEOUT_S = 2.0
#: A pooled connection idle this long is PINGed before use (a restart closed it).
_HEALTH_CHECK_S = 5


def connect_redis(url: str, *, decode_responses: bool = False) -> aioredis.Redis:
    """A client for `url` whose commands retry through a short Redis outage."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        retry=Retry(
            ExponentialWithJitterBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S),
            _RETRIES,
            supported_errors=(ConnectionError, TimeoutError),
        ),
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        health_check_interval=_HEALTH_CHECK_S,
    )
