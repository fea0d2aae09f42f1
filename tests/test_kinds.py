"""Retrieval and entry kinds (kinds.py): every kind has its module and every module its kind, the
descriptors say what the modules do (tables, rows per read), they stay free of torch, and a new kind
is added by registering a descriptor and one module."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modeling_dpsnr import DPSNRForCausalLM
from modeling_dpsnr.kinds import ENTRY_KINDS, RETRIEVAL_KINDS, RetrievalKind
from modeling_dpsnr.pool import PARTITIONS
from modeling_dpsnr.reads import ENTRY_READS, Retrieval
from modeling_dpsnr.retrieval import RETRIEVERS

from conftest import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
V = 97
# one partition of every retrieval kind
EVERY_KIND = dict(pool_size=600, indexer_window=2, ngram_heads=2,
                  pool_partitions={"pk": 0.4, "ex": 0.2, "co": 0.2, "ng": 0.2},
                  pool_partition_retrieval={"ex": "exhaustive", "co": "coordinate", "ng": "hashed_ngram"},
                  loop_phase_schedule=["pk", "ex", "co", "ng"])


def test_every_kind_has_one_module_and_every_module_a_kind():
    assert set(RETRIEVERS).isdisjoint(PARTITIONS)
    assert set(RETRIEVERS) | set(PARTITIONS) == set(RETRIEVAL_KINDS)
    assert set(ENTRY_READS) == set(ENTRY_KINDS)


@pytest.mark.parametrize("entry", sorted(ENTRY_KINDS))
def test_descriptors_state_the_tables_and_rows_the_modules_have(entry):
    model = tiny_model(pool_entry=entry, **EVERY_KIND).eval()
    c = model.config
    assert {c.partition_retrieval(p) for p in c.pool_partitions} == set(RETRIEVAL_KINDS)
    for name, part in model.pool.partitions.items():
        kind = c.partition_kind(name)
        assert tuple(part.entry_tables()) == c.partition_tables(name) == kind.tables(ENTRY_KINDS[entry])
        assert kind.read_macs(c, part.num_entries, c.entry_kind) > 0
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad(), model.pool.track_usage() as usage:
        out = model(ids)
    reads = {p: int((out.reasoning_steps > s).sum()) for s, p in enumerate(c.loop_phase_schedule)}  # tokens reading p
    for name in c.pool_partitions:
        assert int(usage[name]["counts"].sum()) == reads[name] * c.partition_rows_per_read(name), name


def test_the_descriptors_import_nothing_but_the_standard_library():
    """The config checks kinds while it is built: kinds.py must not pull torch or a module in."""
    for name in ("kinds.py", "validation.py"):
        tree = ast.parse((ROOT / "modeling_dpsnr" / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module == "validation", f"{name} imports .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                top = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                assert top == "__future__" or top in sys.stdlib_module_names, f"{name} imports {top}"


# ---------------------------------------------------------------------------- a new kind, as one would add it
class FirstRows(RetrievalKind):
    """Toy kind: head h reads rows h·k .. h·k + k − 1 with equal weights, whatever the token."""

    name = "first_rows"

    def check(self, config, partitions):
        for name, size in partitions.items():
            if size < config.pool_heads * config.pool_topk:
                raise ValueError(f"pool_topk ({config.pool_topk}) × pool_heads is larger than partition {name!r}.")

    def reads_per_head(self, config):
        return config.pool_topk

    def select_macs(self, config, num_entries):
        return 0.0

    def describe(self, config):
        return "the first rows"


class FirstRowsRetriever(nn.Module):
    def __init__(self, config, num_entries):
        super().__init__()
        self.heads, self.topk = config.pool_heads, config.pool_topk

    def forward(self, x, token_mask=None):
        idx = torch.arange(self.heads * self.topk, device=x.device).view(1, self.heads, self.topk)
        idx = idx.expand(x.shape[0], -1, -1)  # (n, H, k)
        return Retrieval(indices=idx, weights=torch.full(idx.shape, 1.0 / self.topk, dtype=x.dtype, device=x.device))


@pytest.fixture
def first_rows(monkeypatch):
    monkeypatch.setitem(RETRIEVAL_KINDS, "first_rows", FirstRows())  # what @register_retrieval does
    monkeypatch.setitem(RETRIEVERS, "first_rows", FirstRowsRetriever)


def test_a_kind_is_added_by_a_descriptor_and_its_module(first_rows, tmp_path):
    with pytest.raises(ValueError, match="pool_topk"):
        tiny_config(pool_retrieval="first_rows", pool_topk=20)  # its own check, naming the field
    model = tiny_model(pool_partition_retrieval={"grammar": "first_rows"}).train()
    ids = torch.randint(0, V, (2, 6))
    model(ids, labels=ids).loss.backward()
    grammar = model.pool["grammar"]
    touched = grammar.v.grad.abs().sum(-1) > 0
    assert touched[: 2 * 3].all() and not touched[2 * 3:].any()  # exactly the rows the kind reads
    assert model.estimate_flops() > 0 and model.config.partition_rows_per_read("grammar") == 6
    model.save_pretrained(tmp_path)
    loaded = DPSNRForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_unknown_kinds_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="pool_retrieval must be one of"):
        tiny_config(pool_retrieval="first_rows")
    with pytest.raises(ValueError, match="pool_entry must be one of"):
        tiny_config(pool_entry="expert")
