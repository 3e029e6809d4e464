"""Metrics our example models log that torch does not ship: the area under the ROC curve of a binary classifier."""

from __future__ import annotations

import torch

__all__ = ["binary_auc"]


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The area under the ROC curve: the chance that a random positive scores above a random negative.

    Computed from ranks (the Mann–Whitney U statistic): sort the scores, give tied scores their average rank,
    and ``AUC = (sum of the positives' ranks - P (P + 1) / 2) / (P N)`` for ``P`` positives and ``N`` negatives.
    Ties count one half, exactly as the pairwise definition does. ``O(n log n)``, in float64.

    Args:
        scores: one score per sample (any monotone transform of a probability: logits work as well).
        labels: one label per sample, ``1``/``True`` for positives and ``0``/``False`` for negatives.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: shapes differ, labels other than 0 and 1, or no positives or no negatives (AUC is undefined).

    >>> binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])).item()
    0.75
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    labels = labels.detach().reshape(-1)
    if scores.numel() != labels.numel():
        raise ValueError(
            f"binary_auc needs one label per score, got {scores.numel()} scores and {labels.numel()} labels."
        )
    positive = labels.to(torch.float64)
    if labels.numel() and not bool(((positive == 0) | (positive == 1)).all()):
        raise ValueError(
            f"binary_auc needs labels of 0 and 1, got values {sorted(set(labels.tolist()))[:5]}. "
            f"Binarise them first, e.g. `labels == positive_class`."
        )
    num_positive = positive.sum()
    num_negative = positive.numel() - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"AUC is undefined without both classes: got {int(num_positive)} positives and {int(num_negative)} "
            f"negatives among {labels.numel()} samples. Score more samples (a whole validation epoch)."
        )
    sorted_scores, order = torch.sort(scores)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # Tied scores share the mean of the 1-based ranks they span: the group's first rank plus (count - 1) / 2.
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_ranks = ends - (counts.to(torch.float64) - 1.0) / 2.0
    ranks = torch.empty_like(scores)
    ranks[order] = torch.repeat_interleave(mean_ranks, counts)
    rank_sum = (ranks * positive).sum()
    return (rank_sum - num_positive * (num_positive + 1.0) / 2.0) / (num_positive * num_negative)
