"""Deferred parameters: a read waits for its own parameter, reads of others and metadata do not; copies on CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_patterns.strategies.parameter_server.device import HostCopier, make_copier
from lightning_patterns.strategies.parameter_server.overlap import PendingParameters


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.fixture
def guard(model: nn.Sequential) -> Iterator[tuple[PendingParameters, list[int]]]:
    """A guard over the model's parameters whose `wait` records the request and delivers the new values (ones)."""
    params = list(model.parameters())
    waited: list[int] = []
    holder: list[PendingParameters] = []

    def wait(index: int) -> None:
        waited.append(index)
        with torch.no_grad():
            params[index].fill_(1.0)
        holder[0].arrived(index)

    pending = PendingParameters(params, wait)
    holder.append(pending)
    yield pending, waited
    pending.pending = {}
    pending.disarm()


def test_the_forward_waits_for_each_parameter_when_it_reads_it(
    model: nn.Sequential, guard: tuple[PendingParameters, list[int]]
) -> None:
    pending, waited = guard
    pending.arm(range(4))
    out = model[0](torch.zeros(1, 3))  # the first layer's weight and bias, nothing else
    assert waited == [0, 1]
    assert out.tolist() == [[1.0] * 4], "it computed on the new values"
    model(torch.zeros(1, 3))
    assert waited == [0, 1, 2, 3]
    assert pending.disarm(), "everything arrived: the mode leaves the stack"
    assert torch.overrides._get_current_function_mode() is None  # type: ignore[no-untyped-call]


def test_reads_outside_a_forward_wait_too_and_metadata_never_does(
    model: nn.Sequential, guard: tuple[PendingParameters, list[int]]
) -> None:
    pending, waited = guard
    pending.arm(range(4))
    weight = model[2].weight
    assert weight.shape == (2, 4)
    assert weight.dtype == torch.float32
    assert weight.grad is None
    assert weight.numel() == 8
    assert weight.dim() == 2
    assert waited == []
    assert not pending.disarm(), "a parameter is pending: the mode stays"
    torch.randn(3).sum()  # reads no parameter
    assert waited == []
    assert float(weight.detach().t().sum()) == 8.0  # a tied projection, a regularizer: any read of the tensor
    assert waited == [2]
    model.state_dict()  # a checkpoint reads them all
    assert sorted(waited) == [0, 1, 2, 3]


def test_a_view_made_before_the_round_waits_for_its_base(
    model: nn.Sequential, guard: tuple[PendingParameters, list[int]]
) -> None:
    pending, waited = guard
    view = model[0].bias[:2]  # e.g. a slice cached by a module
    pending.arm([1])
    assert (view * 2).tolist() == [2.0, 2.0]
    assert waited == [1]


def test_a_mode_pushed_later_keeps_the_guard_until_it_leaves(
    model: nn.Sequential, guard: tuple[PendingParameters, list[int]]
) -> None:
    pending, _ = guard
    pending.arm([0])
    pending.arrived(0)
    with TorchFunctionMode():
        assert not pending.disarm(), "not innermost: popping it would pop the user's mode"
    assert pending.disarm()


def test_the_host_copier_scales_in_the_copy_and_is_chosen_for_cpu() -> None:
    copier = make_copier(torch.device("cpu"))
    assert isinstance(copier, HostCopier)
    assert not copier.asynchronous
    source, destination = torch.arange(4.0), torch.zeros(4)
    ticket = copier.to_host([(source, destination)], 0.5)
    copier.wait_host(ticket)
    assert destination.tolist() == [0.0, 0.5, 1.0, 1.5]
    back = torch.zeros(4)
    copier.order_after(copier.to_device([(destination, back)]))
    assert back.tolist() == destination.tolist()


@pytest.mark.gpu
def test_the_cuda_copier_orders_copies_after_the_compute_stream() -> None:
    device = torch.device("cuda")
    copier = make_copier(device)
    assert copier.asynchronous
    host = copier.host_buffer(1 << 20, torch.float32)
    assert host.is_pinned()
    grad = torch.ones(1 << 20, device=device)
    torch.cuda._sleep(10_000_000)  # the compute stream is busy when the copy is queued
    grad.mul_(3.0)
    ticket = copier.to_host([(grad, host)], 0.5)
    copier.wait_host(ticket)
    assert float(host[-1]) == 1.5, "the copy waited for the multiplication queued before it"
    param = torch.zeros(1 << 20, device=device)
    copier.order_after(copier.to_device([(host, param)]))
    assert float(param.sum()) == 1.5 * (1 << 20)
