"""binary_auc equals the pairwise definition (ties count one half) and refuses what has no AUC."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.metrics import binary_auc


def _pairwise_auc(scores: list[float], labels: list[int]) -> float:
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@given(
    st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 1)), min_size=2, max_size=60).filter(
        lambda pairs: len({label for _, label in pairs}) == 2
    )
)
def test_equals_the_pairwise_definition_with_ties(pairs: list[tuple[int, int]]) -> None:
    scores = [float(score) / 2 for score, _ in pairs]  # few distinct values: many ties
    labels = [label for _, label in pairs]
    auc = binary_auc(torch.tensor(scores), torch.tensor(labels))
    assert auc.dtype == torch.float64
    assert auc.item() == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_known_values_and_label_types() -> None:
    assert binary_auc(torch.tensor([0.9, 0.1]), torch.tensor([True, False])).item() == 1.0
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 0.0])).item() == 0.0
    assert binary_auc(torch.zeros(4), torch.tensor([0, 1, 0, 1])).item() == 0.5


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (torch.zeros(3), torch.zeros(2), "binary_auc needs one label per score, got 3 scores and 2 labels"),
        (torch.zeros(3), torch.tensor([0, 1, 2]), "binary_auc needs labels of 0 and 1, got values [0, 1, 2]"),
        (torch.zeros(3), torch.ones(3), "AUC is undefined without both classes: got 3 positives and 0 negatives"),
        (torch.zeros(0), torch.zeros(0), "got 0 positives and 0 negatives"),
    ],
)
def test_refuses_what_has_no_auc(scores: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        binary_auc(scores, labels)
