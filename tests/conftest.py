"""Test-wide guards: offline hub, deterministic CPU numerics, and no sockets beyond loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["MPLBACKEND"] = "Agg"  # as on a headless CI host; the notebook pipeline must still show figures
# Subprocesses (the CLI, the site build, notebook kernels) inherit one torch thread: the suite runs on two
# workers over two cores, and a child with a thread per core beside the other worker ran 2-3x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = address[0]
    elif isinstance(address, (str, bytes)):
        return True  # AF_UNIX paths are local
    else:
        return False
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: refuse


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to reach a non-loopback address."""


_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: object):  # type: ignore[no-untyped-def]
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to open a socket to {address!r}; only loopback is allowed")
    return _original_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object):  # type: ignore[no-untyped-def]
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to open a socket to {address!r}; only loopback is allowed")
    return _original_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = _original_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _original_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    try:
        import torch
    except ImportError:
        yield
        return
    # One thread: tiny models gain nothing from more, and oversubscribed threads made calls 3-100x slower
    # on shared 2-core machines (measured by benchmarks/rollout_overhead.py's author).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models on a shared 2-core CPU run steadier that way."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


# Tests whose cases are independent and long: ``make test`` schedules each case on its own instead of keeping
# the module on one worker. The notebook executions were one unit of about 850 s that one worker ran alone.
ONE_BY_ONE = ("tests/test_notebooks.py::test_notebook_runs_in_smoke_mode[",)


def _runs_one_by_one(nodeid: str) -> bool:
    return nodeid.startswith(ONE_BY_ONE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the one-by-one cases last: they fill the end of the run, where whole modules would leave a worker idle.

    The sort is stable and the same on every worker, as xdist requires of their collections.
    """
    items.sort(key=lambda item: _runs_one_by_one(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201
    """``--dist loadscope`` with a module per unit, except the ``ONE_BY_ONE`` cases, one unit each.

    A module's tests share module fixtures (a trained policy, a served site), so they run on one worker.
    pytest-xdist's own ``loadgroup`` cannot express this under pytest 9: it renames items through
    ``item._nodeid``, which pytest 9 no longer reads, so every test became its own unit and module fixtures
    were built on both workers.
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if _runs_one_by_one(nodeid) else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep collection order: the one-by-one cases stay last
    return ModuleScheduling(config, log)


pytest_plugins = ["site_fixtures"]
