"""Per-RPC metrics count each answer under its status code, errors included."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from threadline import errors
from threadline.client import GatewayClient
from threadline.stack import Stack


def handled(service: str, method: str, code: str) -> float:
    labels = {"service": service, "method": method, "code": code}
    return REGISTRY.get_sample_value("threadline_rpc_handled_total", labels) or 0.0


async def test_an_error_is_counted_under_its_code_in_every_service_it_crossed(
    stack: Stack, gateway: GatewayClient
) -> None:
    get = "/threadline.v1.Gateway/GetSession"
    session_get = "/threadline.v1.Sessions/Get"
    before = (handled("gateway", get, "NOT_FOUND"), handled("session", session_get, "NOT_FOUND"))
    ok_before = handled("gateway", get, "OK")

    with pytest.raises(errors.NotFound):
        await gateway.get_session("ses_" + "0" * 32)

    after = (handled("gateway", get, "NOT_FOUND"), handled("session", session_get, "NOT_FOUND"))
    assert after == (before[0] + 1, before[1] + 1)
    assert handled("gateway", get, "OK") == ok_before
    seconds = REGISTRY.get_sample_value(
        "threadline_rpc_handling_seconds_count", {"service": "gateway", "method": get}
    )
    assert seconds is not None and seconds >= 1
    in_flight = {"service": "gateway", "method": get}
    assert REGISTRY.get_sample_value("threadline_rpc_in_flight", in_flight) == 0
