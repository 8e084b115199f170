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
