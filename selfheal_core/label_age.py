"""Labels that arrive late: do they answer predictions of the traffic served now?

A label by id is about the input its prediction was served for. Days later the
traffic may have moved to another domain (another camera, a season, a new fraud
pattern); training today's weights on the old domain's labels pulls them back
towards traffic that no longer comes, undoing what adaptation to the current
domain gained (issue 28). So old labels are judged by the domain of their
predictions: each run of labels with neighbouring prediction times is compared
with the newest predictions by a permutation test on the difference of their
mean features (in units of the current traffic's spread). A run that differs at
level `alpha` is from a past domain: kept in the log for the record, not learned.
The features' squares are tested beside them: some shifts (noise) move the
spread of the features, not their mean.

Pure functions over tensors; the learner decides which labels are old and where
the features come from.
"""
from __future__ import annotations

import torch

RUN = 64  # labels per tested run: a few days of labels may span several domains


def _statistic(a_mean: torch.Tensor, b_mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (((a_mean - b_mean) / scale) ** 2).sum(-1)


def differs(old: torch.Tensor, current: torch.Tensor, alpha: float, permutations: int = 199,
            seed: int = 0) -> bool:
    """Whether `old` (n, F) and `current` (m, F) features come from different distributions: a
    permutation test of the squared standardised difference of their first and second moments at
    level `alpha`."""
    if alpha <= 0 or len(old) == 0 or len(current) < 2:
        return False
    # first and second moments (a noise corruption moves the spread of features, not their mean),
    # standardised by the pooled sample: a scale that does not depend on which rows are called old
    # keeps the permutation test exact
    pooled = torch.cat([old, current]).double()
    pooled = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-12)
    pooled = torch.cat([pooled, pooled ** 2], 1)
    scale = pooled.std(0) + 1e-6
    n = len(old)
    observed = _statistic(pooled[:n].mean(0), pooled[n:].mean(0), scale)
    total = len(pooled)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.zeros(permutations, total, dtype=torch.float64)
    order = torch.argsort(torch.rand(permutations, total, generator=gen), dim=1)
    pick.scatter_(1, order[:, :n], 1.0)  # row k: which pooled rows play `old` in permutation k
    a = pick @ pooled / n
    b = (1.0 - pick) @ pooled / (total - n)
    null = _statistic(a, b, scale)
    p_value = (1 + int((null >= observed).sum())) / (1 + permutations)
    return p_value < alpha


def past_runs(predicted: list[float], features: torch.Tensor, current: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mask (n,) of labels from a past domain: the labels, sorted by when their predictions were
    served, are cut into runs of at most RUN and each run is tested against `current` (m, F)."""
    past = torch.zeros(len(predicted), dtype=torch.bool)
    order = sorted(range(len(predicted)), key=lambda i: predicted[i])
    for start in range(0, len(order), RUN):
        run = order[start:start + RUN]
        if differs(features[run], current, alpha, seed=start):
            past[run] = True
    return past
