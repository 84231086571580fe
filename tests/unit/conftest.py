"""The unit tier: no servers, no Airflow runs, no network. Any socket connect, bind or name lookup on
an internet family fails the test that tried it (loopback included): a unit test that needs a server
belongs in tests/integration."""

from __future__ import annotations

import socket

import pytest

_INTERNET = (socket.AF_INET, socket.AF_INET6)


class NetworkUsed(RuntimeError):
    pass


def _refuse(what):
    def refused(*args, **kwargs):
        raise NetworkUsed(f"the unit tier uses no network: {what}{args[1:] if args else ''} was called")
    return refused


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    original_connect, original_bind = socket.socket.connect, socket.socket.bind

    def guard(original, what):
        def call(self, *args, **kwargs):
            if self.family in _INTERNET:
                raise NetworkUsed(f"the unit tier uses no network: socket.{what}{args} was called")
            return original(self, *args, **kwargs)
        return call

    monkeypatch.setattr(socket.socket, "connect", guard(original_connect, "connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex, "connect_ex"))
    monkeypatch.setattr(socket.socket, "bind", guard(original_bind, "bind"))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse("socket.getaddrinfo"))
    monkeypatch.setenv("LESION_WEIGHTS_DOWNLOAD", "0")  # no Keras download attempt either
