"""Hashed n-gram memory (hashed.py): causal, deterministic across processes, sparse in its gradients and
its reads, the same in both loop drivers, saved in the pool's own files, and decodable from a cache."""

import json
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_dpsnr import DPSNRForCausalLM
from modeling_dpsnr.hashed import hash_constants, ngram_windows, slot_moduli
from modeling_dpsnr.hashed import is_prime

from conftest import assert_causal, assert_drivers_agree, greedy_without_cache, tiny_config, tiny_model

V = 97
ROOT = Path(__file__).resolve().parents[1]
# knowledge: product keys; grammar: hashed n-grams, read by the loop's last step and in the prelude
# grammar is hashed, read in the prelude and (named in the schedule) at the loop's last step too
MIXED = dict(pool_partition_retrieval={"grammar": "hashed_ngram"}, ngram_heads=2, ngram_prelude_partition="grammar",
             loop_phase_schedule=["knowledge", "reasoning", "reasoning", "grammar"])
# one hashed partition only, read at every step
HASHED = dict(pool_retrieval="hashed_ngram", pool_partitions={"mem": 1.0}, pool_size=400, ngram_heads=2)


def _model(seed=0, loop_mode="auto", varied=True, **overrides):
    """A tiny model whose pool reads matter and whose tokens halt after different numbers of steps."""
    model = tiny_model(seed, loop_halt_bias_init=0.0, execution={"loop_mode": loop_mode}, **overrides)
    with torch.no_grad():
        for t in model.pool.entry_parameters():
            t.normal_(std=0.5)
        if varied and hasattr(model.model.loop.policy, "halt"):
            torch.nn.init.normal_(model.model.loop.policy.halt.weight, std=0.5)
    return model


def _rows(model, ids, name="grammar", attention_mask=None):
    """The rows each token reads from hashed partition `name`: (B, T, J)."""
    part = model.pool[name]
    windows = ngram_windows(ids, attention_mask, None, 0, part.retriever.context)
    return part.retriever(windows).view(*ids.shape, -1)


# ---------------------------------------------------------------------------- the hash
def test_windows_hold_the_last_tokens_and_a_pad_id_before_the_start():
    ids = torch.tensor([[5, 6, 7, 8]])
    w = ngram_windows(ids, None, None, 0, context=3)
    assert w.tolist() == [[6, 0, 0], [7, 6, 0], [8, 7, 6], [9, 8, 7]]  # ids + 1, the token first, 0 = pad
    mask = torch.tensor([[0, 1, 1, 1]])
    assert ngram_windows(ids, mask, None, 0, 3).tolist()[1] == [7, 0, 0]  # padding hashes as the pad id


def test_rows_are_causal_and_depend_only_on_the_last_n_tokens():
    model = tiny_model(**MIXED)
    ids = torch.randint(0, V, (2, 12))
    base = _rows(model, ids)
    context = max(model.config.ngram_orders)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        rows = _rows(model, changed)
        assert torch.equal(rows[:, :t], base[:, :t])  # nothing before t moves
        assert torch.equal(rows[:, t + context:], base[:, t + context:])  # nor anything n-grams no longer reach
        assert not torch.equal(rows[:, t], base[:, t])


def test_changing_token_t_leaves_earlier_logits_unchanged():
    assert_causal(_model(**MIXED).eval(), torch.randint(0, V, (2, 10)), (0, 4, 9), V)


def test_every_slot_reads_inside_its_own_prime_sized_stripe():
    cfg = tiny_config(**HASHED)
    const = hash_constants("mem", cfg.ngram_orders, cfg.ngram_heads, 400)
    starts, moduli = const["slot_start"].tolist(), const["slot_modulus"].tolist()
    assert all(is_prime(p) for p in moduli) and len(set(moduli)) == len(moduli)
    assert all(s + p <= e for s, p, e in zip(starts, moduli, starts[1:] + [400]))
    model = tiny_model(**HASHED)
    rows = _rows(model, torch.randint(0, V, (4, 30)), "mem")  # (B, T, J)
    assert ((rows >= const["slot_start"]) & (rows < const["slot_start"] + const["slot_modulus"])).all()
    assert slot_moduli([100, 100, 100]) == [97, 89, 83] and slot_moduli([3, 3, 3]) == [3, 2, 3]


def test_rows_are_the_same_in_another_process():
    """No Python hash(), no per-process randomness: a fresh interpreter with another hash seed hashes
    the same ids to the same rows (and the rows below pin the hash: changing it breaks checkpoints)."""
    script = textwrap.dedent("""
        import json, torch
        from modeling_dpsnr.hashed import NgramHashRetriever, ngram_windows
        from modeling_dpsnr import DPSNRConfig
        cfg = DPSNRConfig(vocab_size=50000, hidden_size=32, num_attention_heads=4, pool_retrieval="hashed_ngram",
                          pool_partitions={"mem": 1.0}, pool_size=100000, loop_max_steps=2)
        ids = torch.tensor([[11, 49999, 0, 7, 7, 123]])
        r = NgramHashRetriever(cfg, "mem", 100000)
        print(json.dumps(r(ngram_windows(ids, None, None, 0, r.context)).tolist()))
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    here = {}
    exec(script.replace("print(", "here['rows'] = ("), {"here": here})  # this process, its own hash seed
    runs = [json.loads(res.stdout.strip().splitlines()[-1]), json.loads(here["rows"])]
    assert runs[0] == runs[1]
    assert runs[0][0] == [12191, 24900, 29252, 44568, 52178, 66223, 81799, 91018]  # 2-grams: 4 heads, then 3-grams
    assert runs[0][-1] == [8150, 14785, 35223, 45495, 50220, 67811, 79822, 90445]


# ---------------------------------------------------------------------------- gradients and the optimizer
def test_sparse_row_adam_changes_only_the_rows_looked_up():
    from dpsnr.training.pool_optim import SparseRowAdam

    model = _model(**HASHED).train()
    model.set_execution(pool_sparse_grads=True)
    table = model.pool["mem"].v
    ids = torch.randint(0, V, (2, 9))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert table.grad.is_sparse
    rows = _rows(model, ids, "mem")  # (B, T, J)
    looked_up = torch.zeros(table.shape[0], dtype=torch.bool)
    looked_up[rows.flatten()] = True
    scored = torch.zeros_like(looked_up)
    scored[rows[:, :-1].flatten()] = True  # the last token predicts nothing: its rows get a zero gradient
    before = table.detach().clone()
    SparseRowAdam([table], lr=1e-2).step()
    changed = (table.detach() != before).any(-1)
    assert torch.equal(table.detach()[~looked_up], before[~looked_up])  # untouched rows: bit-identical
    assert changed[scored].all() and not changed[~looked_up].any()
    assert model.pool["mem"].slot_weight.grad is not None and model.pool["mem"].key_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- the two loop drivers
@pytest.mark.parametrize("loop_step", ["token", "block"])
def test_eager_and_static_agree_including_gradients(loop_step):
    eager = _model(loop_mode="eager", loop_step=loop_step, **MIXED)
    static = _model(loop_mode="static", loop_step=loop_step, **MIXED)
    static.load_state_dict(eager.state_dict())
    ids = torch.randint(0, V, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    outs = assert_drivers_agree(eager, static, ids, mask)
    assert len(outs[0].reasoning_steps[mask.bool()].unique()) > 1, "test needs tokens halting at different steps"
    assert eager.pool["grammar"].v.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- storage
def test_save_load_round_trip_keeps_the_hashed_table_in_the_pool_files(tmp_path):
    from safetensors.torch import load_file

    model = _model(**MIXED).eval()
    model.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "pool.safetensors.index.json").read_text())
    assert set(index["tables"]) == {"knowledge.u", "knowledge.v", "reasoning.u", "reasoning.v", "grammar.v"}
    assert not any(k.endswith("grammar.v") for k in load_file(tmp_path / "model.safetensors"))
    ids = torch.randint(0, V, (2, 7))
    expected = model(ids).logits
    for kwargs in ({}, {"pool_mmap": True}):
        loaded = DPSNRForCausalLM.from_pretrained(tmp_path, **kwargs).eval()
        assert torch.equal(loaded.pool["grammar"].v, model.pool["grammar"].v)
        for key in ("slot_start", "slot_modulus", "multipliers", "offsets"):  # rebuilt, not saved
            assert torch.equal(getattr(loaded.pool["grammar"].retriever, key), getattr(model.pool["grammar"].retriever, key))
        torch.testing.assert_close(loaded(ids).logits, expected)


def _pages(table, rows):
    row_bytes = table.shape[1] * table.element_size()
    return {(table.data_ptr() + r * row_bytes + b) // mmap.PAGESIZE for r in rows for b in (0, row_bytes - 1)}


def _present_pages(table):
    """Virtual pages of `table` mapped into this process (/proc/self/pagemap bit 63)."""
    first = table.data_ptr() // mmap.PAGESIZE
    last = (table.data_ptr() + table.numel() * table.element_size() - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        data = f.read((last - first + 1) * 8)
    return {first + i for i in range(last - first + 1) if int.from_bytes(data[8 * i:8 * i + 8], "little") >> 63}


class _TableOps(TorchDispatchMode):
    """Every aten op that receives `table` (or a view of its storage), with its integer arguments."""

    def __init__(self, table):
        super().__init__()
        self.ptr = table.untyped_storage().data_ptr()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        if any(a.untyped_storage().data_ptr() == self.ptr for a in flat):
            self.ops.append((func.overloadpacket.__name__, [a for a in flat if not a.is_floating_point()]))
        return func(*args, **(kwargs or {}))


def test_memory_mapped_pool_reads_only_the_rows_looked_up(tmp_path):
    """Loaded with pool_mmap=True, the hashed table is touched only by indexed reads of the hashed rows
    (no whole-table op), and after a cold start only their pages are mapped into the process."""
    if not os.path.exists("/proc/self/pagemap"):
        pytest.skip("needs /proc/self/pagemap")
    model = _model(**dict(HASHED, pool_size=8192, loop_max_steps=2))  # 8192 rows × 128 B: 256 pages
    model.save_pretrained(tmp_path)
    mapped = DPSNRForCausalLM.from_pretrained(tmp_path, pool_mmap=True)
    # Cold start after loading: reading the shard's header left its neighbourhood in the page cache,
    # and a fault maps cached neighbours of the faulting page too.
    fd = os.open(tmp_path / "pool.safetensors", os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    table = mapped.pool["mem"].v
    assert not _present_pages(table)
    ids = torch.randint(0, V, (1, 4))
    rows = set(_rows(mapped, ids, "mem").flatten().tolist())
    with torch.no_grad(), _TableOps(table) as probe:
        mapped(ids, use_cache=False)
    assert probe.ops and {name for name, _ in probe.ops} <= {"embedding", "_embedding_bag", "_embedding_bag_forward_only"}
    assert set(torch.cat([i[0].flatten() for _, i in probe.ops]).tolist()) == rows
    assert _present_pages(table) == _pages(table, rows)  # of 256 pages, those of the rows looked up (≤ 16)


def test_prefetch_asks_for_the_hashed_rows_before_any_block_runs(tmp_path):
    model = _model(**HASHED)
    model.save_pretrained(tmp_path)
    mapped = DPSNRForCausalLM.from_pretrained(tmp_path, pool_mmap=True)
    table = mapped.pool["mem"].v
    events = []
    mapped.pool["mem"].prefetcher.madvise = lambda addr, length, advice: events.append(("madvise", addr, length, advice))
    mapped.model.layers[0].register_forward_pre_hook(lambda *a: events.append(("block",)))
    ids = torch.randint(0, V, (2, 6))
    out = mapped(ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for step_ids, kwargs in ((ids, {}), (nxt, {"past_key_values": out.past_key_values})):  # prefill, then decode
        if kwargs:
            events.clear()
            mapped(step_ids, use_cache=True, **kwargs)
            rows = _rows(mapped, torch.cat([ids, nxt], 1), "mem")[:, -1:]  # the new token's rows
        else:
            rows = _rows(mapped, ids, "mem")
        first_block = events.index(("block",))
        asked = {p for _, addr, length, advice in events[:first_block] for p in range(addr // mmap.PAGESIZE, (addr + length) // mmap.PAGESIZE)}
        assert asked == _pages(table, set(rows.flatten().tolist()))
        assert all(e[3] == mmap.MADV_WILLNEED for e in events[:first_block])


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("loop_step", ["token", "block"])
def test_cached_greedy_generate_equals_uncached_argmax(loop_step):
    model = _model(loop_step=loop_step, **MIXED).eval()
    ids = torch.randint(1, V, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    out, stats = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                return_reasoning_stats=True)
    assert torch.equal(out, greedy_without_cache(model, ids, 6, mask))
    # rows read: 6 per product-key step (2 heads × 3), 4 per hashed read (2 orders × 2 heads), + the prelude read
    per_step = torch.tensor([0, 6, 12, 18, 22])  # schedule knowledge, reasoning, reasoning, grammar
    assert torch.equal(stats["rows_read"], per_step[stats["steps"]] + 4)


def test_beam_search_reorders_the_stored_ids_with_the_cache():
    model = _model(**MIXED).eval()
    ids = torch.randint(1, V, (2, 4))
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_decoding_without_the_stored_ids_is_refused():
    from transformers import DynamicCache

    model = tiny_model(**MIXED).eval()
    ids = torch.randint(0, V, (1, 5))
    foreign = DynamicCache(config=model.config)
    tiny_model(1).eval()(ids, past_key_values=foreign, use_cache=True)  # filled by a model without hashed reads
    with pytest.raises(ValueError, match="ids of 0"):
        model(ids[:, -1:], past_key_values=foreign, use_cache=True)


# ---------------------------------------------------------------------------- statistics and cost
def test_active_params_and_cost_count_the_hashed_reads():
    from modeling_dpsnr.cost import forward_macs, loop_step_macs

    model = _model(**MIXED).eval()
    c = model.config
    out = model(torch.randint(0, V, (2, 8)))
    pk, hashed = c.pool_heads * c.pool_topk * c.pool_entry_params, 4 * c.hidden_size  # 4 value rows of width d
    per_step = torch.tensor([0, pk, 2 * pk, 3 * pk, 3 * pk + hashed])
    assert len(out.reasoning_steps.unique()) > 1
    assert torch.equal(out.active_params, model.model.active_params_base() + per_step[out.reasoning_steps] + hashed)
    d = c.hidden_size
    read = 4 * d + 2 * d * d + d  # weighted rows, W_k and W_v, the gate
    assert loop_step_macs(c, 3, 10) == read + d * d + d  # + the step's gate and the halting head
    assert forward_macs(c, 4, 10)["prelude_read"] == read
    assert model.estimate_pool_bytes(steps=0) == 4 * hashed  # the prelude read alone, fp32


BAD = [
    (dict(pool_partition_retrieval={"memory": "hashed_ngram"}), "pool_partition_retrieval"),
    (dict(pool_partition_retrieval={"grammar": "bloom"}), "pool_partition_retrieval"),
    (dict(pool_partition_retrieval=["grammar"]), "pool_partition_retrieval"),
    (dict(ngram_orders=[]), "ngram_orders"),
    (dict(ngram_orders=[2, 2]), "ngram_orders"),
    (dict(ngram_orders=[0, 2]), "ngram_orders"),
    (dict(ngram_heads=0), "ngram_heads"),
    (dict(pool_partition_retrieval={"g": "hashed_ngram"}, pool_partitions={"k": 0.95, "g": 0.05}), "too small"),
    (dict(ngram_prelude_partition="knowledge"), "ngram_prelude_partition"),
    (dict(MIXED, ngram_prelude_layer=2), "ngram_prelude_layer"),
    (dict(MIXED, vocab_size=2**31), "vocab_size"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_configs_raise_naming_the_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**overrides)


def test_one_model_mixes_retrieval_kinds_per_partition():
    cfg = tiny_config(pool_retrieval="hashed_ngram", pool_partition_retrieval={"knowledge": "product_key"})
    assert [cfg.partition_retrieval(p) for p in ("knowledge", "reasoning", "grammar")] == ["product_key", "hashed_ngram", "hashed_ngram"]
    model = tiny_model(pool_retrieval="hashed_ngram", pool_partition_retrieval={"knowledge": "coordinate"}, indexer_window=4)
    assert type(model.pool["knowledge"].retriever).__name__ == "CoordinateRetriever"
    assert type(model.pool["grammar"]).__name__ == "HashedNgramPartition"
    assert torch.isfinite(model(torch.randint(0, V, (1, 6))).logits).all()
