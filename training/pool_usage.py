"""How evenly the reasoning loop reads a partition of the pool: statistics of the two (N,) tensors
that `ParameterPool.track_usage()` fills (per row: read counts, and the softmax weight mass received).

A pool that keeps being read from the same few rows wastes its size: the rest never trains.
Lample et al. (2019, "Large Memory Layers with Product Keys", sec. 4.3) track two numbers: the
fraction of memory rows accessed, and the KL divergence between the access distribution and the
uniform one. Per partition of N rows:

- % rows read: rows with at least one read / N.
- KL to uniform, in nats, of two distributions: the *count* distribution (reads of row i / all
  reads; PKM's "KL") and the *mass* distribution (softmax weight row i received / total weight).
  KL(p‖U) = Σ p_i log(N p_i) = log N − H(p): 0 for uniform use, log N when one row takes all.
- Gini coefficient of counts and of mass: 0 for equal use, (N − 1)/N when one row takes all.
- Rows holding 50 / 90 / 99 % of the mass: the fewest rows (largest first) whose mass reaches
  that share, as a number and as % of N.

Pure functions of torch tensors, below both users: DPSNRTrainer logs % rows read and KL to uniform
over each logging window (callbacks.py), and `dpsnr pool-health` reports all of them on a text.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

MASS_LEVELS = (0.5, 0.9, 0.99)
# Slack when comparing cumulative shares with the levels: the pool accumulates mass in float32
# (relative error ~1e-7), so 0.7 + 0.2 of the mass must count as reaching 90 %.
_TOL = 1e-6


def usage_statistics(counts: torch.Tensor, mass: torch.Tensor, levels: tuple[float, ...] = MASS_LEVELS) -> dict:
    """Usage statistics of one partition from per-row read counts and weight mass (both (N,)).

    Distribution statistics are None when their total is 0 (a partition no step read).
    """
    counts, mass = _check_usage(counts, mass)
    n = counts.numel()
    rows_read = int((counts > 0).sum())
    stats = {
        "rows": n,
        "reads": int(counts.sum()),
        "rows_read": rows_read,
        "frac_rows_read": rows_read / n,
        "kl_max": math.log(n),  # KL of a one-row distribution: the scale of the two KL values
        "kl_uniform_counts": kl_to_uniform(counts),
        "kl_uniform_mass": kl_to_uniform(mass),
        "gini_counts": gini(counts),
        "gini_mass": gini(mass),
    }
    for level in levels:
        k = rows_for_share(mass, level)
        key = f"{level * 100:g}"
        stats[f"rows_mass_{key}"] = k
        stats[f"frac_rows_mass_{key}"] = None if k is None else k / n
    return stats


def _check_usage(counts: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts, mass = torch.as_tensor(counts), torch.as_tensor(mass)
    if counts.dim() != 1 or counts.shape != mass.shape or counts.numel() == 0:
        raise ValueError(
            f"counts and mass must be non-empty 1-D tensors of one length, got {tuple(counts.shape)} and {tuple(mass.shape)}"
        )
    counts, mass = counts.detach().cpu().double(), mass.detach().cpu().double()
    if bool((counts < 0).any()) or bool((mass < 0).any()) or not bool(torch.isfinite(mass).all()):
        raise ValueError("counts and mass must be finite and non-negative")
    return counts, mass


def kl_to_uniform(values: torch.Tensor) -> Optional[float]:
    """KL(p ‖ uniform) in nats, p = values / Σ values (0·log 0 = 0); None if Σ values = 0."""
    values = values.double()
    total = values.sum()
    if total <= 0:
        return None
    p = values / total
    nz = p[p > 0]
    return max(0.0, float((nz * torch.log(nz * values.numel())).sum()))


def gini(values: torch.Tensor) -> Optional[float]:
    """Gini coefficient (x sorted ascending, i = 1..n): 2 Σ i·x_i / (n Σ x) − (n + 1) / n."""
    x = values.double().sort().values
    total = x.sum()
    if total <= 0:
        return None
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max(0.0, float(2 * (i * x).sum() / (n * total) - (n + 1) / n))


def rows_for_share(mass: torch.Tensor, share: float) -> Optional[int]:
    """Fewest rows, largest first, whose mass reaches `share` of the total; None if the total is 0."""
    m = mass.double().sort(descending=True).values
    total = m.sum()
    if total <= 0:
        return None
    cum = m.cumsum(0) / total
    return min(m.numel(), int((cum < share - _TOL).sum()) + 1)


def lorenz_curve(values: torch.Tensor, points: int = 512) -> tuple[list[float], list[float]]:
    """(share of rows, share of the total held by them), rows sorted from least to most used."""
    x = values.double().sort().values
    n, total = x.numel(), x.sum()
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), x.cumsum(0) / (total if total > 0 else 1.0)])
    idx = torch.linspace(0, n, min(points, n + 1)).round().long()
    return (idx.double() / n).tolist(), cum[idx].tolist()
