import pytest

import spicestream
from spicestream.testing.client import TestClient


@pytest.fixture
def server():
    srv = spicestream.Server(port=0, width=320, height=240, streaming_video="off").start()
    yield srv
    srv.stop()


@pytest.fixture
def connect(server):
    clients = []

    def _connect(**kwargs):
        client = TestClient("127.0.0.1", server.port, **kwargs).connect()
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()
