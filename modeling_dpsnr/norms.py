"""Normalisations: one RMSNorm for the whole model, and the query norms of product keys.

`DPSNRRMSNorm` normalises the controller blocks, the loop's states and token embeddings, the hashed
read's gate, and (as `RMSQueryNorm`) product-key queries. The query norms (`pool_query_norm`) take the
token mask as a second argument, since the running one keeps statistics of real tokens only:
    "rms"      RMSNorm over each head's query
    "layer"    LayerNorm over each head's query
    "running"  each query dimension standardised per head with statistics of earlier training forwards
Never BatchNorm: it mixes the positions of a batch (a token's query would depend on later tokens of its
batch) and breaks on padding; "running" gives its effect on usage without either fault.
"""

from __future__ import annotations

import torch
from torch import nn


class DPSNRRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in float32 as transformers' Llama does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


# The query norms share one constructor, (heads, dim, eps, momentum), so `QUERY_NORMS` builds any of them.
class RMSQueryNorm(DPSNRRMSNorm):
    """RMSNorm over each head's query (n, H, c); the token mask is not needed."""

    def __init__(self, heads: int, dim: int, eps: float, momentum: float | None = None):
        super().__init__(dim, eps)

    def forward(self, q: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(q)


class LayerQueryNorm(nn.LayerNorm):
    """LayerNorm over each head's query (n, H, c); the token mask is not needed."""

    def __init__(self, heads: int, dim: int, eps: float, momentum: float | None = None):
        super().__init__(dim, eps=eps)

    def forward(self, q: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(q)


class RunningQueryNorm(nn.Module):
    """Standardise each query dimension, per head, with running statistics: what BatchNorm did for
    product-key usage (Lample et al. 2019: rows read 25.8 % → 80.3 %) without its two faults in a
    causal model. A forward is normalised with statistics of earlier training forwards only (this
    forward's are gathered and folded into the EMA when the next one begins, `commit`), so a token's
    query never depends on other tokens of its batch, even when a partition is read at several
    steps; only real tokens count (padding-independent). The very first training forward, with no
    earlier statistics, uses its own. Evaluation uses the running statistics."""

    def __init__(self, heads: int, dim: int, eps: float, momentum: float):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(dim))  # affine, as BatchNorm's
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(heads, dim))
        self.register_buffer("running_var", torch.ones(heads, dim))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        # this forward's sums (weight, Σq, Σq²), folded in by `commit`
        # persistent: a checkpoint taken between two forwards must carry them, or a resumed run diverges
        self.register_buffer("pending", torch.zeros(3, heads, dim))

    def forward(self, q: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        q32 = q.float()  # (n, H, c)
        mean, var = self.running_mean, self.running_var
        if self.training:
            with torch.no_grad():
                w = torch.ones(q.shape[0], device=q.device) if token_mask is None else token_mask.float()  # (n,)
                qd = q32.detach()
                self.pending[0].add_(w.sum())
                self.pending[1].add_(torch.einsum("n,nhc->hc", w, qd))
                self.pending[2].add_(torch.einsum("n,nhc->hc", w, qd * qd))
                own_mean, own_var = self._moments(self.pending)
            mean = torch.where(self.calibrated, mean, own_mean)
            var = torch.where(self.calibrated, var, own_var)
        q32 = (q32 - mean) * torch.rsqrt(var + self.eps)
        return (self.weight * q32 + self.bias).to(q.dtype)

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the last training forward's statistics into the running ones (tensor ops only: no
        host sync, so it traces)."""
        has_rows = self.pending[0, 0, 0] > 0
        mean, var = self._moments(self.pending)
        rate = torch.where(self.calibrated, torch.full((), self.momentum, device=mean.device),
                           torch.ones((), device=mean.device)) * has_rows.float()
        self.running_mean.lerp_(mean, rate)
        self.running_var.lerp_(var, rate)
        self.calibrated.logical_or_(has_rows)
        self.pending.zero_()

    @staticmethod
    def _moments(pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = pending[0].clamp(min=1)
        mean = pending[1] / total
        return mean, (pending[2] / total - mean * mean).clamp(min=0)


# config `pool_query_norm` → module, built as cls(heads, dim, eps, momentum) and called as norm(q, token_mask)
QUERY_NORMS: dict[str, type[nn.Module]] = {"rms": RMSQueryNorm, "layer": LayerQueryNorm, "running": RunningQueryNorm}

__all__ = ["DPSNRRMSNorm", "LayerQueryNorm", "QUERY_NORMS", "RMSQueryNorm", "RunningQueryNorm"]
