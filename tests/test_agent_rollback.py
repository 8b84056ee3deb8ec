"""Health checks that fail roll back to the previous version; crashes mid-install recover."""

from __future__ import annotations

import asyncio

import pytest

from agent.install import Installer
from modules.store import ContentStore
from tests.hubside import HubSide, new_device, running_agent, until


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def test_failing_health_check_rolls_back_to_previous_version(hub, tmp_data):
    device = new_device()
    v1 = hub.build("classifier", 1)
    v2 = hub.build("classifier", 2, failing=True)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data) as agent:
            hub.publish_desired(device, 1, [v1.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "running", 20, "v1 running")
            hub.publish_desired(device, 2, [v2.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "rolled_back", 20, "v2 rolled back")
            mod = hub.reported(device).modules[0]
            assert mod.bundle == v2.digest and "health check failed" in mod.error and "broken" in mod.error
            base = tmp_data / "modules" / "classifier"
            assert (base / "current").readlink().name == v1.digest
            assert not (base / v2.digest).exists()
            assert agent.active["classifier"].bundle == v1.digest  # still serving the old version
            assert agent.installer.journal.get("classifier").state == "rolled_back"

    asyncio.run(main())


def test_failing_first_install_ends_failed_with_nothing_active(hub, tmp_data):
    device = new_device()
    bad = hub.build("classifier", 1, failing=True)

    async def main() -> None:
        async with running_agent(hub, device, tmp_data) as agent:
            hub.publish_desired(device, 1, [bad.desired()])
            await until(lambda: hub.module_state(device, "classifier") == "failed", 20, "install failed")
            assert "health check failed" in hub.reported(device).modules[0].error
            assert agent.installer.current("classifier") is None and not agent.active

    asyncio.run(main())


class Crash(Exception):
    pass


@pytest.mark.parametrize("v2_failing, expect", [(False, "v2"), (True, "v1")])
def test_crash_during_activation_recovers_to_old_or_new(hub, tmp_data, v2_failing, expect):
    v1 = hub.build("classifier", 1)
    v2 = hub.build("classifier", 2, failing=v2_failing)
    chunks = ContentStore(tmp_data / "chunks")
    for b in (v1, v2):
        for data in b.chunks.values():
            chunks.put(data)

    async def fetcher(bundle):
        async def fetch():
            return bundle.envelope
        return fetch

    async def main() -> None:
        inst = Installer(tmp_data, hub.trusted_root(), chunks)
        assert (await inst.install(v1.desired(), await fetcher(v1))).state == "committed"

        def crash(name, digest):  # power cut just before the symlink swap
            raise Crash()
        inst._swap = crash
        with pytest.raises(Crash):
            await inst.install(v2.desired(), await fetcher(v2))
        assert inst.journal.get("classifier").state == "activating"

        again = Installer(tmp_data, hub.trusted_root(), chunks)  # the reboot
        await again.recover()
        entry = again.journal.get("classifier")
        assert entry.state == ("committed" if expect == "v2" else "rolled_back")
        assert again.current("classifier") == (v2 if expect == "v2" else v1).digest
        await again.recover()  # idempotent
        assert again.journal.get("classifier").state == entry.state

    asyncio.run(main())
