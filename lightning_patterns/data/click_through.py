"""A synthetic click-through dataset drawn from a known latent-factor model, so the best possible AUC is known.

Each sample is one impression: a user, an item, a few dense features, and whether it was clicked. The
generating model (:class:`ClickThroughModel`) is a biased matrix factorisation with a linear dense part::

    logit(user, item, x) = global_bias + user_bias[user] + item_bias[item] + <user_factors[user], item_factors[item]>
                           + <dense_weights, x>
    P(click) = sigmoid(logit)

Users and items are drawn with Zipf popularity: id ``k`` is the ``k``-th most popular, with the probability of
``[k + 1, k + 2)`` under the density ``x ** -exponent`` on ``[1, count + 1)``, about ``(k + 1.5) ** -exponent``
(a bounded power law, sampled by inverting its distribution function: no table of ``count`` weights). Dense
features are standard normal, and the label is a Bernoulli draw with the model's probability, which each sample
also carries (field ``"probability"``): the AUC of that field on a validation split is the generating model's
AUC, the ceiling a learned model approaches.

Every per-id parameter is a pure function of ``(seed, id)`` (:mod:`lightning_patterns._counter_random`), so a table
of ten million items costs nothing until an id is drawn, and samples are generated in fixed-size blocks each
from its own seed, so any range of a split is produced without what comes before it.

Fields of a sample: ``"ids"`` (``int64[2]``: user, item), ``"dense"`` (``float32[num_dense]``), ``"label"``
(``int64``: 1 for a click), ``"probability"`` (``float32``: the generating model's click probability; for
reference only, a model must not read it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lightning_patterns._counter_random import counter_normal, stream_key

__all__ = ["ClickThroughModel", "ClickThroughSamples", "click_through_arrays"]

_BLOCK = 8192
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Streams of the per-id parameters, so users and items never share values.
_USER_FACTORS, _ITEM_FACTORS, _USER_BIAS, _ITEM_BIAS, _DENSE = 1, 2, 3, 4, 5


def _zipf_ids(uniform: np.ndarray, count: int, exponent: float) -> np.ndarray:
    """Ids in ``[0, count)``: the floor of a power-law draw on ``[1, count + 1)``, by inverting its distribution."""
    top = float(count) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        ranks = np.power(top, uniform)
    else:
        power = 1.0 - exponent
        ranks = np.power(1.0 + uniform * (top**power - 1.0), 1.0 / power)
    return np.clip(np.floor(ranks).astype(np.int64) - 1, 0, count - 1)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ClickThroughModel:
    """The generating model: Zipf-popular users and items, latent factors, biases, and dense weights.

    Args:
        num_users: rows of the user table; user ids are ``0 .. num_users - 1``.
        num_items: rows of the item table; item ids are ``0 .. num_items - 1``.
        num_dense: dense features per sample.
        latent_dim: dimension of the user and item factors.
        user_exponent: Zipf exponent of user popularity (larger: fewer users take more of the traffic).
        item_exponent: Zipf exponent of item popularity.
        factor_scale: standard deviation of each factor component (the interaction's standard deviation is
            ``factor_scale ** 2 * sqrt(latent_dim)``).
        bias_scale: standard deviation of the per-user and per-item biases.
        dense_scale: standard deviation of the dense weights.
        global_bias: the logit's constant; sets the overall click rate.
        seed: fixes every parameter.

    >>> model = ClickThroughModel(num_users=100, num_items=1000, seed=1)
    >>> probability = model.probability(np.array([0, 5]), np.array([3, 999]), np.zeros((2, 4), dtype=np.float32))
    >>> probability.shape, bool(((0 < probability) & (probability < 1)).all())
    ((2,), True)
    """

    num_users: int = 10_000
    num_items: int = 100_000
    num_dense: int = 4
    latent_dim: int = 8
    user_exponent: float = 1.05
    item_exponent: float = 1.05
    factor_scale: float = 0.6
    bias_scale: float = 0.5
    dense_scale: float = 0.5
    global_bias: float = -1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_dense", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClickThroughModel needs `{name}` >= 1, got {name}={getattr(self, name)!r}.")
        for name in ("user_exponent", "item_exponent"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"ClickThroughModel needs a positive Zipf exponent, got {name}={getattr(self, name)!r}; "
                    f"1.05 is a typical popularity skew."
                )
        for name in ("factor_scale", "bias_scale", "dense_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"ClickThroughModel needs `{name}` >= 0, got {name}={getattr(self, name)!r}.")

    def _per_id(self, stream: int, ids: np.ndarray, width: int) -> np.ndarray:
        return counter_normal(stream_key(self.seed, stream), ids, width)

    def user_factors(self, users: np.ndarray) -> np.ndarray:
        """The factors of ``users``: ``float64 [len(users), latent_dim]``."""
        return self.factor_scale * self._per_id(_USER_FACTORS, users, self.latent_dim)

    def item_factors(self, items: np.ndarray) -> np.ndarray:
        """The factors of ``items``: ``float64 [len(items), latent_dim]``."""
        return self.factor_scale * self._per_id(_ITEM_FACTORS, items, self.latent_dim)

    def dense_weights(self) -> np.ndarray:
        """The weights of the dense features: ``float64 [num_dense]``."""
        weights: np.ndarray = self.dense_scale * self._per_id(_DENSE, np.zeros(1, dtype=np.int64), self.num_dense)[0]
        return weights

    def logits(self, users: np.ndarray, items: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The model's click logit of each (user, item, dense features) sample: ``float64 [N]``."""
        interaction = np.einsum("nd,nd->n", self.user_factors(users), self.item_factors(items))
        user_bias = self.bias_scale * self._per_id(_USER_BIAS, users, 1)[:, 0]
        item_bias = self.bias_scale * self._per_id(_ITEM_BIAS, items, 1)[:, 0]
        return self.global_bias + user_bias + item_bias + interaction + dense.astype(np.float64) @ self.dense_weights()  # type: ignore[no-any-return]

    def probability(self, users: np.ndarray, items: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The model's click probability of each sample: ``float64 [N]``."""
        return 1.0 / (1.0 + np.exp(-self.logits(users, items, dense)))  # type: ignore[no-any-return]

    def _block(self, split: str, block: int) -> dict[str, np.ndarray]:
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, 104729, _SPLIT_IDS[split], block]))
        )
        users = _zipf_ids(rng.random(_BLOCK), self.num_users, self.user_exponent)
        items = _zipf_ids(rng.random(_BLOCK), self.num_items, self.item_exponent)
        dense = rng.standard_normal((_BLOCK, self.num_dense), dtype=np.float32)
        probability = self.probability(users, items, dense)
        labels = (rng.random(_BLOCK) < probability).astype(np.int64)
        return {
            "ids": np.stack([users, items], axis=1),
            "dense": dense,
            "label": labels,
            "probability": probability.astype(np.float32),
        }


def click_through_arrays(
    model: ClickThroughModel, num_samples: int, *, split: str = "train", start: int = 0
) -> dict[str, np.ndarray]:
    """Samples ``[start, start + num_samples)`` of a split, one array per field (see the module docstring).

    Args:
        model: the generating model.
        num_samples: how many samples.
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share samples (they share the model).
        start: index of the first sample.

    >>> arrays = click_through_arrays(ClickThroughModel(num_users=10, num_items=20), 5, split="val")
    >>> {name: (array.dtype.name, array.shape) for name, array in arrays.items()}["ids"]
    ('int64', (5, 2))
    """
    if num_samples < 0 or start < 0:
        raise ValueError(f"`num_samples` and `start` must be >= 0, got num_samples={num_samples}, start={start}.")
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}. Expected one of: {', '.join(_SPLIT_IDS)}.")
    stop = start + num_samples
    parts: dict[str, list[np.ndarray]] = {}
    for block in range(start // _BLOCK, -(-stop // _BLOCK)):
        lo, hi = max(start, block * _BLOCK) - block * _BLOCK, min(stop, (block + 1) * _BLOCK) - block * _BLOCK
        for name, array in model._block(split, block).items():
            parts.setdefault(name, []).append(array[lo:hi])
    if not parts:
        empty = model._block(split, 0)
        return {name: array[:0] for name, array in empty.items()}
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


class ClickThroughSamples:
    """``num_samples`` samples of a split as a sized iterable of dicts, the way the shard writer takes them.

    Generates a block at a time, so a split is never held in memory whole.

    Args:
        model: the generating model.
        num_samples: how many samples.
        split: ``"train"``, ``"val"`` or ``"test"``.

    >>> samples = ClickThroughSamples(ClickThroughModel(num_users=10, num_items=20), 3)
    >>> len(samples), sorted(next(iter(samples)))
    (3, ['dense', 'ids', 'label', 'probability'])
    """

    def __init__(self, model: ClickThroughModel, num_samples: int, *, split: str = "train") -> None:
        self.model = model
        self.num_samples = num_samples
        self.split = split

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for block_start in range(0, self.num_samples, _BLOCK):
            count = min(_BLOCK, self.num_samples - block_start)
            arrays = click_through_arrays(self.model, count, split=self.split, start=block_start)
            names = list(arrays)
            for values in zip(*(arrays[name] for name in names), strict=True):
                yield dict(zip(names, values, strict=True))
