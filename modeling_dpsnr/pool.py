"""The parameter pool: its named partitions, each built by the module of its retrieval kind.

    product_key, exhaustive, coordinate  →  retrieval.PoolPartition over the kind's retriever (RETRIEVERS)
    hashed_ngram                          →  hashed.HashedNgramPartition (PARTITIONS: rows from the token ids)

kinds.py describes each kind (config checks, cost, table layout); the registries map it onto the
module that runs it. A partition module is built as cls(config, name, num_entries), owns its (N, d)
entry tables through `reads.EntryTables`, and is called as part(query_input, x, read, token_mask, rows)
→ (read (n, d), Retrieval), where `read` (reads.PoolRead) is how this forward reads the pool, decided
once by the model (`plan_read`); the pool adds usage statistics over every partition.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .configuration_dpsnr import DPSNRConfig
from .hashed import HashedNgramPartition, prepare_token_reads
from .kinds import product_key_sizes, stripe_bounds
from .norms import RunningQueryNorm
from .reads import EAGER_READ, PoolRead, Retrieval, weighted_row_sum
from .retrieval import CoordinateRetriever, PoolPartition, ProductKeyRetriever

# retrieval kind (kinds.RETRIEVAL_KINDS) → its partition module, for kinds that do not read through a
# retriever (retrieval.RETRIEVERS, whose partitions are PoolPartitions)
PARTITIONS: dict[str, type[nn.Module]] = {"hashed_ngram": HashedNgramPartition}


def build_partition(config: DPSNRConfig, name: str, num_entries: int) -> nn.Module:
    """The partition `name` of `num_entries` entries, of its retrieval kind."""
    return PARTITIONS.get(config.partition_retrieval(name), PoolPartition)(config, name, num_entries)


class ParameterPool(nn.Module):
    """All partitions of the pool, by name, plus optional usage tracking."""

    def __init__(self, config: DPSNRConfig):
        super().__init__()
        self.partitions = nn.ModuleDict(
            {name: build_partition(config, name, size) for name, size in config.partition_sizes().items()}
        )
        self._usage: dict[str, dict[str, torch.Tensor]] | None = None
        # Hashed n-gram partitions address rows by the token ids, not by the state: hashed once per
        # forward, before any layer runs (`plan_read`).
        self.reads_tokens = any(getattr(part, "reads_tokens", False) for part in self.partitions.values())

    def plan_read(self, static: bool, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cache,
                  cache_layer: int, sum_table_grads: bool = False) -> PoolRead:
        """How this forward reads the pool: the loop driver's read mode (`static`, from the ExecutionPlan)
        and the rows of partitions that follow from the token ids, hashed now (and, for a memory-mapped
        pool, asked for) before any layer runs; earlier ids come from `cache` layer `cache_layer`.
        `sum_table_grads`: a training forward whose reads are never recomputed (DPSN-R's loop runs outside
        the checkpointed layers) sums each table's gradient over its reads once (reads.TableGradients)."""
        rows = prepare_token_reads(self, input_ids, attention_mask, cache, cache_layer) if self.reads_tokens else None
        grads = {} if sum_table_grads and torch.is_grad_enabled() and not static else None
        return PoolRead(static=static, token_rows=rows, table_grads=grads)

    def __getitem__(self, name: str) -> nn.Module:
        return self.partitions[name]

    def begin_forward(self) -> None:
        """Called once per model forward, before any read: running query statistics gathered by
        the previous training forward are folded in now (see norms.RunningQueryNorm)."""
        for module in self.modules():
            if isinstance(module, RunningQueryNorm):
                module.commit()

    def apply_execution(self, plan) -> None:
        """Take the pool's part of an `ExecutionPlan` (sparse gradients, row reads, fused reads)."""
        for part in self.partitions.values():
            part.apply_execution(plan)

    def entry_parameters(self) -> list[nn.Parameter]:
        """The (N, d) entry tables: the parameters a sparse row-wise optimizer owns."""
        return [t for part in self.partitions.values() for t in part.entry_tables().values()]

    def forward(
        self,
        partition: str,
        query_input: torch.Tensor,
        x: torch.Tensor,
        read: PoolRead = EAGER_READ,
        token_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read `partition` for n tokens. `rows` (n,): which of the forward's B·T tokens they are
        (hashed n-gram partitions take their rows, hashed up front, from `read.token_rows`)."""
        out, r = self.partitions[partition](query_input, x, read=read, token_mask=token_mask, rows=rows)
        if self._usage is not None:
            self._record(partition, r, token_mask)
        return out

    # ------------------------------------------------------------------ usage statistics
    @contextlib.contextmanager
    def track_usage(self, usage: dict[str, dict[str, torch.Tensor]] | None = None):
        """Count, per partition, how often each entry is read and the weight mass it receives.

        Yields a dict name → {"counts": (N,) int64, "mass": (N,) float32}, filled as forwards run.
        Pass the dict of an earlier call to keep accumulating into it (no new O(N) buffers).
        """
        if usage is None:
            usage = {}
            for name, part in self.partitions.items():
                device = part.v.device if part.v.device.type != "meta" else torch.device("cpu")
                usage[name] = {
                    "counts": torch.zeros(part.num_entries, dtype=torch.int64, device=device),
                    "mass": torch.zeros(part.num_entries, dtype=torch.float32, device=device),
                }
        previous, self._usage = self._usage, usage
        try:
            yield usage
        finally:
            self._usage = previous

    @torch.no_grad()
    def _record(self, partition: str, r: Retrieval, token_mask: torch.Tensor | None) -> None:
        idx, w = r.indices, r.weights.float()  # (n, H, k)
        hits = torch.ones_like(idx)
        if token_mask is not None:  # masked tokens add 0 (no boolean indexing: XLA, see _update_balance)
            hits = hits * token_mask.view(-1, 1, 1)
        stats = self._usage[partition]
        idx = idx.reshape(-1).to(stats["counts"].device)
        stats["counts"].index_add_(0, idx, hits.reshape(-1).to(stats["counts"].device))
        stats["mass"].index_add_(0, idx, (w * hits).reshape(-1).to(stats["mass"].device))


__all__ = [
    "PARTITIONS", "ParameterPool", "build_partition",
    # defined in retrieval.py, reads.py and kinds.py; importable from here as before the pool was split
    "CoordinateRetriever", "PoolPartition", "ProductKeyRetriever", "Retrieval", "product_key_sizes", "stripe_bounds",
    "weighted_row_sum",
]
