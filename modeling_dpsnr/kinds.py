"""Kinds of pool partitions, as lightweight descriptors: how a partition chooses its rows (retrieval
kinds: config `pool_retrieval`, `pool_partition_retrieval`) and what a row holds (entry kinds: `pool_entry`).

    RETRIEVAL_KINDS  product_key   exact top-k over two product sub-key tables, O(√N) per head (Lample et al. 2019)
                     exhaustive    the same keys scored against every entry: the O(N) reference of product_key
                     coordinate    a learned indexer reads a Gaussian-weighted window of K contiguous rows per head
                     hashed_ngram  rows hashed from the last token ids, gated by the state (Engram, DeepSeek 2026)
    ENTRY_KINDS      neuron        (u, v) per entry, contributing act(u·x)·v: PEER's single-neuron experts (He 2024)
                     value         v per entry

A descriptor is pure Python: its name, the config invariants it needs (raised as errors naming the field),
its cost (MACs and pool parameters read per token), its table layout, and the words a model card uses.
So the config checks a kind while it is being built (`DPSNRConfig.__post_init__`), and the cost model,
the pool files, the pool tool and the model card ask the kind instead of branching on its name, without
torch and without the modules. The nn.Modules that run a kind are registered against its name where they
are defined, one registry per role:
    retrieval.RETRIEVERS   a kind read through a retriever: the module choosing (indices, weights) per head,
                           which a generic PoolPartition reads (product_key, exhaustive, coordinate)
    pool.PARTITIONS        a kind that reads its own way: its whole partition module (hashed_ngram)
    reads.ENTRY_READS      entry kinds: how the chosen rows are combined
tests/test_kinds.py checks that every kind here has its module and every module its kind, and adds a
kind the way a new one would be added.

Why descriptors beside the modules rather than one class per kind: the modules import the config (for
its sizes) and torch; a config that imported them to check a kind would close an import circle, and the
config, the cost model and the card would depend on nn.Modules they never run.

Adding a retrieval kind: subclass `RetrievalKind` below (checks, cost, tables, words), decorate it with
`@register_retrieval`, and register its module (a retriever in retrieval.RETRIEVERS, or a partition in
pool.PARTITIONS). Adding an entry kind: subclass `EntryKind` with `@register_entry`, and add its read to
reads.ENTRY_READS. Config values are the kinds' names: saved configs keep loading.
"""

from __future__ import annotations

import math

from .validation import check_choice, check_nonneg_int, check_positive_float, check_positive_int, check_rate, is_int

NGRAM_HASH_PRIME = (1 << 31) - 1  # hashed.py hashes token ids + 1 modulo this Mersenne prime
INDEXER_BALANCES = ("none", "quantile")


def _registrar(registry: dict):
    """A class decorator that registers one instance of the class under its `name`."""

    def register(cls):
        registry[cls.name] = cls()
        return cls

    return register


# ---------------------------------------------------------------------------- integer layouts (no torch)
def product_key_sizes(num_entries: int) -> tuple[int, int]:
    """Sub-key table sizes n1 ≥ n2 with n1·n2 ≥ N and n1·n2 − N < n2 (at most one partial row)."""
    n2 = max(1, math.isqrt(num_entries))
    n1 = -(-num_entries // n2)
    return n1, n2


def stripe_bounds(num_entries: int, heads: int) -> list[tuple[int, int]]:
    """Head h's stripe of a partition: rows [⌊h·N/H⌋, ⌊(h+1)·N/H⌋); every row in exactly one stripe."""
    edges = [h * num_entries // heads for h in range(heads + 1)]
    return list(zip(edges[:-1], edges[1:]))


# ---------------------------------------------------------------------------- entry kinds
class EntryKind:
    """What one pool entry stores. Each table is (N, hidden_size), named in state-dict and file order."""

    name: str
    tables: tuple[str, ...]
    description: str  # how a model card describes the entries
    hub_tags: tuple[str, ...] = ()

    def params_per_row(self, hidden_size: int) -> int:
        """Parameters of one entry, which is also the MACs of combining one read row (u·x and the weighted v)."""
        return len(self.tables) * hidden_size


ENTRY_KINDS: dict[str, EntryKind] = {}
register_entry = _registrar(ENTRY_KINDS)


@register_entry
class NeuronEntry(EntryKind):
    name = "neuron"
    tables = ("u", "v")
    description = "PEER single-neuron experts, each a key u and a value v contributing act(u·x)·v"
    hub_tags = ("peer",)


@register_entry
class ValueEntry(EntryKind):
    name = "value"
    tables = ("v",)
    description = "value vectors v"


# ---------------------------------------------------------------------------- retrieval kinds
class RetrievalKind:
    """How a partition chooses the rows a token reads. `config` is a DPSNRConfig throughout."""

    name: str
    reads_tokens = False  # rows follow from the token ids alone, known before any layer runs
    sub_keys = False  # selects through product sub-keys, which `pool_balance="bias"` steers
    keeps_relative_positions = False  # rows are addressed by relative position in a head's stripe
    size_shaped_parameters = False  # parameter shapes follow the partition size (a grown pool re-initialises them)
    hub_tags: tuple[str, ...] = ()

    def check(self, config, partitions: dict[str, int]) -> None:
        """Raise ValueError naming the field where `config` cannot build `partitions` (name → entries) of
        this kind. Called once per config, with {} when no partition has this kind."""

    def tables(self, entry: EntryKind) -> tuple[str, ...]:
        return entry.tables

    def reads_per_head(self, config) -> int:
        raise NotImplementedError

    def rows_per_read(self, config) -> int:
        """Rows one read takes per token."""
        return config.pool_heads * self.reads_per_head(config)

    def select_macs(self, config, num_entries: int) -> float:
        """MACs per token of choosing the rows of one read."""
        raise NotImplementedError

    def read_macs(self, config, num_entries: int, entry: EntryKind) -> float:
        """MACs per token of one read: choosing the rows and combining them."""
        rows = self.rows_per_read(config) * len(self.tables(entry)) * config.hidden_size
        return self.select_macs(config, num_entries) + rows

    def scored_params(self, config, num_entries: int) -> float:
        """Pool parameters the choice reads per token, besides the rows themselves."""
        return 0.0

    def describe(self, config) -> str:
        """One phrase for model cards."""
        raise NotImplementedError


RETRIEVAL_KINDS: dict[str, RetrievalKind] = {}
register_retrieval = _registrar(RETRIEVAL_KINDS)


@register_retrieval
class ProductKeys(RetrievalKind):
    name = "product_key"
    sub_keys = True
    size_shaped_parameters = True  # sub-key tables of ≈√N rows
    hub_tags = ("product-key-memory",)

    def check(self, config, partitions):
        for name, size in partitions.items():
            if size < config.pool_topk:
                raise ValueError(
                    f"pool_topk ({config.pool_topk}) is larger than partition {name!r} ({size} entries of "
                    f"pool_size={config.pool_size}); raise pool_size or lower pool_topk."
                )

    def reads_per_head(self, config):
        return config.pool_topk

    def select_macs(self, config, num_entries):
        query = config.hidden_size * config.pool_heads * config.pool_key_dim
        n1, n2 = product_key_sizes(num_entries)
        return query + config.pool_heads * (n1 + n2) * config.pool_key_dim / 2

    def scored_params(self, config, num_entries):
        return config.pool_heads * sum(product_key_sizes(num_entries)) * config.pool_key_dim / 2

    def describe(self, config):
        return (f"product keys (Lample et al. 2019): per head two sub-key tables of about √N rows; exact "
                f"top-{config.pool_topk} of N at O(√N) cost per head, with softmax weights over the {config.pool_topk}")


@register_retrieval
class Exhaustive(ProductKeys):
    """The product keys' own reference: every entry's score is formed, so its choice is O(N) per head."""

    name = "exhaustive"
    hub_tags = ()

    def select_macs(self, config, num_entries):
        query = config.hidden_size * config.pool_heads * config.pool_key_dim
        return query + config.pool_heads * num_entries * config.pool_key_dim / 2

    def describe(self, config):
        return "exhaustive scoring of every entry (the reference path)"


@register_retrieval
class CoordinateWindows(RetrievalKind):
    name = "coordinate"
    keeps_relative_positions = True  # the indexer predicts a position relative to the head's stripe
    hub_tags = ("coordinate-retrieval",)

    def check(self, config, partitions):
        if not partitions:  # the indexer_* fields are read only by coordinate partitions
            return
        check_positive_int("indexer_hidden_size", config.indexer_hidden_size)
        check_positive_int("indexer_window", config.indexer_window)
        check_positive_float("indexer_min_sigma", config.indexer_min_sigma)
        check_choice("indexer_balance", config.indexer_balance, INDEXER_BALANCES)
        check_positive_int("indexer_balance_bins", config.indexer_balance_bins)
        check_rate("indexer_balance_momentum", config.indexer_balance_momentum)
        for name, size in partitions.items():
            if size < config.indexer_window * config.pool_heads:
                raise ValueError(
                    f"indexer_window ({config.indexer_window}) × pool_heads ({config.pool_heads}) is larger than "
                    f"partition {name!r} ({size} entries): each head needs a stripe of at least one window."
                )

    def reads_per_head(self, config):
        return config.indexer_window

    def select_macs(self, config, num_entries):  # the indexer MLP
        return config.hidden_size * config.indexer_hidden_size + config.indexer_hidden_size * 2 * config.pool_heads

    def describe(self, config):
        return (f"coordinate windows: a learned indexer (MLP {config.hidden_size}→{config.indexer_hidden_size}) predicts "
                f"a centre and a width per head; the head reads {config.indexer_window} contiguous rows, Gaussian-weighted, "
                "so the cost of a read does not depend on N and it is one contiguous slice on disk")


@register_retrieval
class HashedNgrams(RetrievalKind):
    """Values only, whatever `pool_entry` says; the read has its own projections and gate (hashed.py)."""

    name = "hashed_ngram"
    reads_tokens = True

    def check(self, config, partitions):
        orders = config.ngram_orders  # the ngram_* fields are checked even without a hashed partition
        if not isinstance(orders, list) or not orders or any(not is_int(o) or o < 1 for o in orders):
            raise ValueError(f"ngram_orders must be a non-empty list of positive n-gram lengths, got {orders!r}.")
        if len(set(orders)) != len(orders):
            raise ValueError(f"ngram_orders must not repeat an order, got {orders}.")
        check_positive_int("ngram_heads", config.ngram_heads)
        if partitions and config.vocab_size > NGRAM_HASH_PRIME - 2:
            raise ValueError(f"vocab_size ({config.vocab_size}) must be below 2^31 - 2 for hashed_ngram partitions "
                             "(token ids + 1 are hashed modulo the prime 2^31 - 1).")
        for name, size in partitions.items():
            if size < 2 * config.ngram_slots:
                raise ValueError(
                    f"partition {name!r} ({size} entries) is too small for its {config.ngram_slots} hash slots "
                    f"(ngram_orders × ngram_heads): each slot needs a prime-sized stripe of at least 2 rows."
                )
        prelude = config.ngram_prelude_partition
        if prelude is not None:
            if prelude not in partitions:
                raise ValueError(
                    f"ngram_prelude_partition ({prelude!r}) must name a partition of kind 'hashed_ngram'; "
                    f"hashed partitions: {list(partitions)}."
                )
            check_nonneg_int("ngram_prelude_layer", config.ngram_prelude_layer)
            if config.ngram_prelude_layer > config.num_prelude_layers:
                raise ValueError(
                    f"ngram_prelude_layer ({config.ngram_prelude_layer}) must be at most num_prelude_layers "
                    f"({config.num_prelude_layers}): the read sits in the prelude."
                )

    def tables(self, entry):
        return ("v",)

    def reads_per_head(self, config):  # one row per order for each hash head
        return len(config.ngram_orders)

    def rows_per_read(self, config):
        return config.ngram_slots

    def select_macs(self, config, num_entries):  # hashing is O(J·C) integer work, not counted
        return 0.0

    def read_macs(self, config, num_entries, entry):
        d = config.hidden_size
        return config.ngram_slots * d + 2 * d * d + d  # weighted rows, W_k and W_v, the gate's dot product

    def describe(self, config):
        return (f"hashed n-grams (Engram, DeepSeek 2026): the last {max(config.ngram_orders)} token ids hashed into "
                f"{config.ngram_slots} rows, summed with learned slot weights and gated by the state")


__all__ = ["ENTRY_KINDS", "EntryKind", "RETRIEVAL_KINDS", "RetrievalKind", "NGRAM_HASH_PRIME", "product_key_sizes",
           "register_entry", "register_retrieval", "stripe_bounds"]
