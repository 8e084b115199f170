import pytest

from tests.procs import WorkerProc, minilm_path


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def minilm_worker(e2e_tmp):
    worker = WorkerProc(e2e_tmp, minilm_path(), "minilm")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def netns_hosts():
    """Make "hosts" (network namespaces joined to ours by veth pairs, tests/netns.py): call it
    with a short name; every host made is destroyed (its processes killed) after the module.
    Skips, printing why, where namespaces cannot be made (not root, no iproute2/nftables)."""
    from tests.netns import NetnsHost, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network-namespace hosts unavailable: {reason}")
    made: list[NetnsHost] = []

    def make(name: str) -> NetnsHost:
        host = NetnsHost(name)
        made.append(host)
        host.create()
        return host

    try:
        yield make
    finally:
        for host in reversed(made):
            host.destroy()
