"""free_port: distinct ports, each xdist worker in its own block below the kernel's ephemeral range."""
from __future__ import annotations

import socket

import pytest

from multiproc import free_port


def test_ports_are_free_and_never_handed_out_twice() -> None:
    ports = [free_port() for _ in range(200)]  # 200 of 2000: a repeat is near certain without the bookkeeping
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert 20000 <= port < 32768  # below /proc/sys/net/ipv4/ip_local_port_range's default start
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("one, other", [("gw0", "gw1"), ("", "gw0"), ("gw1", "gw2")])
def test_two_workers_draw_from_disjoint_blocks(monkeypatch: pytest.MonkeyPatch, one: str, other: str) -> None:
    drawn = {}
    for worker in (one, other):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        drawn[worker] = {free_port() // 2000 for _ in range(20)}
    assert len(drawn[one]) == len(drawn[other]) == 1 and drawn[one] != drawn[other]
