"""`threadline up` on localhost: internal ports take only calls carrying its own service token."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAKE_MODEL
from tests.ports import free_ports
from tests.processes import threadline_up, wait_healthy
from threadline import errors
from threadline.channels import ChannelSecurity
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES
from threadline.peers import SessionClient
from threadline.testing.fake_upstream import FakeUpstream, Script

pytestmark = pytest.mark.slow


async def test_up_guards_its_internal_ports_with_a_token_of_its_own(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Local and guarded.")
    addresses = {
        name: f"127.0.0.1:{port}"
        for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True)
    }
    data = tmp_path / "data"
    config = tmp_path / "threadline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data),
                "log_level": "warning",
                "addresses": addresses,
                "llm": {"upstream": {"base_url": fake_upstream.base_url, "model": FAKE_MODEL}},
            }
        )
    )
    async with threadline_up(config) as up:
        # Health needs no token: probes and this wait keep working.
        await wait_healthy(addresses["gateway"])
        token_file = data / "service-token"
        token = token_file.read_text().strip()
        anyone = SessionClient(addresses["session"])
        with pytest.raises(errors.Unauthenticated, match="missing service token"):
            await anyone.list("dev")
        await anyone.close()

        key = (data / "dev-api-key").read_text().strip()
        async with GatewayClient(addresses["gateway"], api_key=key) as gateway:
            session = await gateway.create_session()
            events = [e async for e in gateway.converse(session.id, "Hi!")]
        ours = SessionClient(addresses["session"], ChannelSecurity(token=token))
        listed = [s.id for s in (await ours.list("dev")).sessions]
        await ours.close()
        up.terminate()
        await asyncio.wait_for(up.wait(), 30)

    answer = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert answer == "Local and guarded."
    assert listed == [session.id]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
