"""What the servers may run on chunks, the hyperparameters that follow the workers, and the GradScaler they drive."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from lightning_patterns.strategies.parameter_server.grad_scaler import (
    gradients_finite,
    unscale_gradients,
    update_grad_scaler,
)
from lightning_patterns.strategies.parameter_server.optimizers import (
    ELEMENTWISE_OPTIMIZERS,
    HyperparameterLayout,
    describe_param_groups,
    elementwise_name,
)

#: Settings that exercise each optimizer's per-element state (and its per-parameter scalars).
_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "adam": {"lr": 0.05, "amsgrad": True, "weight_decay": 0.01},
    "adamw": {"lr": 0.05, "weight_decay": 0.1},
    "adamax": {"lr": 0.05},
    "nadam": {"lr": 0.05, "decoupled_weight_decay": True, "weight_decay": 0.01},
    "radam": {"lr": 0.05},
    "rmsprop": {"lr": 0.01, "centered": True, "momentum": 0.5},
    "adagrad": {"lr": 0.1, "lr_decay": 0.01},
    "adadelta": {"lr": 1.0},
    "asgd": {"lr": 0.05, "t0": 2.0},
    "rprop": {"lr": 0.01},
}


def _run(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], chunks: tuple[int, ...]) -> torch.Tensor:
    """Six steps on a 4×5 parameter held whole (``chunks=()``) or as views of the given sizes, one per "server"."""
    flat = torch.linspace(-1, 1, 20, dtype=torch.float64)
    cuts = [0, *torch.tensor(chunks).cumsum(0).tolist(), 20] if chunks else [0, 20]
    # As on a server: each chunk a detached view of one flat tensor.
    params = [flat[a:b].detach().requires_grad_(True) for a, b in itertools.pairwise(cuts)]
    optimizer = cls([{"params": [p]} for p in params], **kwargs)
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        grad = torch.randn(20, generator=generator, dtype=torch.float64)
        for p, a, b in zip(params, cuts, cuts[1:], strict=False):
            p.grad = None if step == 2 else grad[a:b].clone()  # a step without gradients is skipped
        optimizer.step()
    return torch.cat([p.detach() for p in params])


@pytest.mark.parametrize("name", ELEMENTWISE_OPTIMIZERS.names())
def test_every_allowed_optimizer_gives_the_same_result_on_chunks_as_on_the_whole(name: str) -> None:
    cls = ELEMENTWISE_OPTIMIZERS.get(name)
    whole = _run(cls, _SETTINGS[name], ())
    for chunks in ((7,), (3, 9), (1, 1, 17)):
        torch.testing.assert_close(_run(cls, _SETTINGS[name], chunks), whole, rtol=1e-12, atol=1e-12)
    assert not torch.equal(whole, torch.linspace(-1, 1, 20, dtype=torch.float64))  # it did move


def test_the_allow_list_covers_the_settings_checked_here() -> None:
    assert sorted(_SETTINGS) == ELEMENTWISE_OPTIMIZERS.names()


def _shaped(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], split: bool) -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.randn(4, 6)
    params = (
        [weight[:2].clone().requires_grad_(True), weight[2:].clone().requires_grad_(True)]
        if split
        else [weight.clone().requires_grad_(True)]
    )
    optimizer = cls(params, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(4, 6, generator=generator)
        if split:
            params[0].grad, params[1].grad = grad[:2].clone(), grad[2:].clone()
        else:
            params[0].grad = grad
        optimizer.step()
    return torch.cat([p.detach() for p in params])


def test_adafactor_is_not_element_wise_which_is_why_servers_refuse_it() -> None:
    """Its factored second moment spans rows and columns: halves of a matrix update differently."""
    assert not torch.allclose(
        _shaped(torch.optim.Adafactor, {"lr": 0.1}, split=True),
        _shaped(torch.optim.Adafactor, {"lr": 0.1}, split=False),
    )


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        (lambda p: torch.optim.Adafactor(p), "torch.optim.Adafactor"),
        (lambda p: torch.optim.LBFGS(p), "torch.optim.lbfgs.LBFGS"),
        (lambda p: _MySGD(p, lr=0.1), "_MySGD"),  # a subclass may change `step`
    ],
)
def test_anything_else_is_refused_naming_the_fix(optimizer: Any, named: str) -> None:
    with pytest.raises(ValueError, match=f"{named} is not one of them.*update_on='worker'"):
        elementwise_name(optimizer([torch.zeros(2, requires_grad=True)]))
    assert elementwise_name(torch.optim.AdamW([torch.zeros(2, requires_grad=True)])) == "adamw"


def test_hyperparameters_travel_as_a_vector_keeping_their_types() -> None:
    param = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([{"params": [param]}, {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}])
    optimizer.param_groups[0]["custom_int"] = 3
    groups = describe_param_groups(optimizer)
    layout = HyperparameterLayout(groups)
    assert "params" not in groups[0]
    optimizer.param_groups[0]["betas"] = (0.5, 0.6)  # OneCycleLR cycles beta1
    optimizer.param_groups[1]["lr"] = 0.25
    vector = layout.vector(optimizer.param_groups)
    server = torch.optim.Adam(
        [{"params": [torch.zeros(2, requires_grad=True)], **groups[0]}, {"params": [torch.zeros(1)], **groups[1]}]
    )
    layout.apply(vector, server.param_groups)
    assert server.param_groups[0]["betas"] == (0.5, 0.6)
    assert server.param_groups[1]["lr"] == 0.25
    assert server.param_groups[0]["custom_int"] == 3
    assert type(server.param_groups[0]["custom_int"]) is int
    moved = layout.vector(server.param_groups)
    assert layout.difference(vector, moved) is None
    moved[0] += 1
    assert layout.difference(vector, moved) is not None
    assert HyperparameterLayout.from_json(layout.to_json()).slots == layout.slots
    optimizer.param_groups[0]["betas"] = (0.5, 0.6, 0.7)
    with pytest.raises(ValueError, match="'betas' changed from 2 number"):
        layout.vector(optimizer.param_groups)


def test_a_hyperparameter_that_is_not_json_is_refused() -> None:
    optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"Param group 0's 'lr' is a Tensor.*a float `lr`, not a tensor"):
        describe_param_groups(optimizer)


def test_the_scaler_updates_as_torch_does_from_a_decision_made_elsewhere() -> None:
    """Our `update_grad_scaler` against torch's own `GradScaler.step`/`update`, over skips, growth and backoff."""
    ours = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    param = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.1)
    for found_inf in (False, False, True, False, True, True, False, False, False):
        theirs.scale(torch.ones(()))  # the scale exists once a loss was scaled
        ours.scale(torch.ones(()))
        param.grad = torch.full((3,), float("inf") if found_inf else 1.0)
        theirs.unscale_(optimizer)
        theirs.step(optimizer)
        theirs.update()
        update_grad_scaler(ours, found_inf)
        assert ours.state_dict() == theirs.state_dict()
    assert theirs.get_scale() != 1024.0


def test_unscaling_matches_the_scalers_and_inf_is_found() -> None:
    param = torch.zeros(3, requires_grad=True)
    reference = torch.zeros(3, requires_grad=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0)
    scaler.scale(torch.ones(()))
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    reference.grad = param.grad.clone()
    scaler.unscale_(torch.optim.SGD([reference], lr=0.1))
    unscale_gradients([param], scaler.get_scale())
    torch.testing.assert_close(param.grad, reference.grad, rtol=0, atol=0)
    assert gradients_finite([param])
    param.grad[1] = float("nan")
    assert not gradients_finite([param, torch.zeros(1, requires_grad=True)])
