"""The network guard itself: a test that reaches outside loopback must fail."""

import socket

import pytest
from conftest import NetworkAccessError


def test_non_loopback_socket_is_refused():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessError, match="only loopback"):
            sock.connect(("93.184.216.34", 80))
    finally:
        sock.close()


def test_loopback_socket_is_allowed():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(server.getsockname())
    finally:
        client.close()
        server.close()


def test_hub_is_offline():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
