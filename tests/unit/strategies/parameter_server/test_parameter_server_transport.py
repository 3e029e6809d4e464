"""Transports: shared-memory regions between real processes, the per-pair choice, and messages through a region."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_patterns.strategies.parameter_server.link import (
    TRANSPORTS,
    Link,
    SharedMemoryTransport,
    TcpTransport,
    choose_transport,
)
from lightning_patterns.strategies.parameter_server.messages import Params, PayloadSpec, Push, dtype_code
from lightning_patterns.strategies.parameter_server.shm import NAME_PREFIX, HostCard, Region, RegionError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared memory is Linux-only")


def _mapped(name: str) -> bool:
    return f"memfd:{name}" in Path("/proc/self/maps").read_text()


def test_a_region_is_shared_with_another_process_in_place() -> None:
    region = Region.create("test-shared", 64)
    mine = region.tensor(torch.float32, 16)
    mine.copy_(torch.arange(16, dtype=torch.float32))
    child = textwrap.dedent(
        """
        import json, sys, torch
        from lightning_patterns.strategies.parameter_server.shm import Region
        theirs = Region.open(json.loads(sys.argv[1])).tensor(torch.float32, 16)
        print(float(theirs.sum()))
        theirs[3] = -1.0  # written in place: the creator sees it
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child, json.dumps(region.describe())], capture_output=True, text=True, check=True
    )
    assert float(out.stdout) == sum(range(16))
    assert mine[3] == -1.0
    assert region.name.startswith(f"{NAME_PREFIX}-{os.getpid()}-")


def test_a_region_is_freed_once_nothing_maps_it() -> None:
    region = Region.create("test-freed", 4096)
    view = region.tensor(torch.uint8, 4096)
    view.fill_(7)
    assert _mapped(region.name)
    assert not [e for e in Path("/dev/shm").iterdir() if region.name in e.name], "a region has no name in /dev/shm"
    region.release()
    assert _mapped(region.name), "views keep the memory"
    assert view.sum() == 7 * 4096
    name = region.name
    del view, region
    assert not _mapped(name)


@pytest.mark.parametrize(
    ("description", "match"),
    [
        ({"pid": 1, "fd": 0}, "Not a shared-memory region description"),
        ({"pid": os.getpid(), "fd": 0, "nbytes": 8, "name": "elsewhere"}, "Not a parameter-server region"),
        (
            {"pid": 2**22 + 7, "fd": 3, "nbytes": 8, "name": f"{NAME_PREFIX}-x"},
            r"one host, in one PID namespace, as one user; otherwise use transport='tcp'",
        ),
    ],
)
def test_a_region_that_cannot_be_mapped_says_why(description: dict[str, Any], match: str) -> None:
    with pytest.raises(RegionError, match=match):
        Region.open(description)


def test_a_descriptor_reused_for_another_file_is_refused(tmp_path: Path) -> None:
    region = Region.create("test-reused", 8)
    description = {**region.describe(), "name": f"{NAME_PREFIX}-{os.getpid()}-another"}
    with pytest.raises(RegionError, match="not the region"):
        Region.open(description)
    with pytest.raises(RegionError, match="does not fit region"):
        region.tensor(torch.float64, 2)


def test_host_cards_say_which_pairs_can_share_memory() -> None:
    probe = Region.create("test-probe", 1)
    server = HostCard.here(probe)
    worker = HostCard.here()
    assert HostCard.from_json(server.to_json()) == server
    assert worker.same_host(server)
    assert worker.can_map_probe_of(server)
    elsewhere = HostCard("other", "another-boot", server.pid_namespace, 1, server.probe)
    assert not worker.same_host(elsewhere)
    assert not worker.can_map_probe_of(elsewhere)
    assert not worker.can_map_probe_of(worker), "a worker has no probe"


def test_each_pair_gets_shared_memory_where_it_can_and_the_request_allows() -> None:
    assert TRANSPORTS.names() == ["shm", "tcp"]
    assert choose_transport("auto", True) == "shm"
    assert choose_transport("auto", False) == "tcp"
    assert choose_transport("tcp", True) == "tcp"
    assert choose_transport("shm", True) == "shm"
    with pytest.raises(ValueError, match="transport='shm' needs every worker and server on one host"):
        choose_transport("shm", False)


def test_payloads_use_a_region_only_where_it_fits_and_the_rest_goes_on_the_group() -> None:
    transport = SharedMemoryTransport()
    assert transport.outgoing(PayloadSpec("grad", 4, torch.float32)) is None  # nothing attached: TCP
    region = torch.zeros(10)
    transport.attach(outgoing={"grad": region}, incoming={"values": region})
    view = transport.outgoing(PayloadSpec("grad", 4, torch.float32, offset=6))
    assert view is not None
    assert view.data_ptr() == region[6:].data_ptr()
    # A payload that does not fit (variable-size rows, say), of another dtype or name, travels on the group.
    assert transport.outgoing(PayloadSpec("grad", 5, torch.float32, offset=6)) is None
    assert transport.outgoing(PayloadSpec("grad", 4, torch.float64)) is None
    assert transport.outgoing(PayloadSpec("rows", 4, torch.float32)) is None
    assert transport.incoming(PayloadSpec("values", 10, torch.float32)) is not None
    transport.detach()
    assert not transport.attached
    assert TcpTransport().incoming(PayloadSpec("values", 1, torch.float32)) is None


class _Recorder:
    """A group that delivers in order, per (source, tag), and records what it carried."""

    def __init__(self) -> None:
        self.queues: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.sent: list[tuple[int, int]] = []

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Any:
        self.sent.append((tag, tensors[0].numel()))
        self.queues.setdefault((dst, tag), []).append(tensors[0].clone())
        return _Done()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        queue = self.queues.setdefault((1 if src == 0 else 0, tag), [])
        return _Done(lambda: tensors[0].copy_(queue.pop(0)))


class _Done:
    def __init__(self, then: Any = None) -> None:
        self.then = then

    def wait(self, timeout: Any = None) -> bool:
        if self.then is not None:
            self.then()
            self.then = None
        return True

    def is_completed(self) -> bool:
        return True


def test_a_message_through_shared_memory_sends_only_its_header() -> None:
    group = _Recorder()
    region = Region.create("test-link", 4 * 8)
    shared = region.tensor(torch.float32, 8)
    worker, server = Link(group, 0, 5.0), Link(group, 1, 5.0)  # type: ignore[arg-type]
    worker.transports[1], server.transports[0] = SharedMemoryTransport(), SharedMemoryTransport()
    worker.shared_memory(1).attach(outgoing={"grad": shared})  # type: ignore[union-attr]
    server.shared_memory(0).attach(incoming={"grad": shared})  # type: ignore[union-attr]
    spec = PayloadSpec("grad", 4, torch.float32, offset=4)
    buffer = worker.outgoing(1, spec)
    assert buffer is not None
    buffer.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # written once, where the server reads it
    push = Push(bucket=1, offset=4, numel=4, dtype=dtype_code(torch.float32))
    sent = worker.send(push, 1, {"grad": buffer})
    assert sent == 12 * 8 + 4 * 4, "bytes count the payload, whichever way it travels"
    assert group.sent == [(11, 12)], "the header only: no payload on the group"
    message, payloads, received = server.recv(0)
    assert message == push
    assert payloads["grad"].data_ptr() == shared[4:].data_ptr(), "read in place"
    assert payloads["grad"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert received == sent
    # A private tensor is copied into the region once; a reply without a region travels on the group.
    worker.send(push, 1, {"grad": torch.full((4,), 9.0)})
    assert server.recv(0)[1]["grad"].tolist() == [9.0] * 4
    reply = Params(numel=4, dtype=dtype_code(torch.float32))
    server.send(reply, 0, {"values": torch.ones(4)})
    assert group.sent[-1] == (12, 4), "no region for replies here: the payload went on the group"
    landing = torch.zeros(8)
    _, payloads, _ = worker.recv(1, into={"values": landing})
    assert payloads["values"].data_ptr() == landing.data_ptr()


@pytest.mark.gpu
def test_a_region_is_page_locked_for_asynchronous_copies_to_a_gpu() -> None:
    region = Region.create("test-pinned", 4 << 20)
    host = region.tensor(torch.float32, 1 << 20)
    assert not host.is_pinned()
    assert region.pin()
    assert host.is_pinned(), "CUDA copies from and to the region run asynchronously"
    device = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    host.copy_(device, non_blocking=True)
    torch.cuda.synchronize()
    assert float(host[-1]) == float((1 << 20) - 1)
    region.release()
    assert not host.is_pinned()
