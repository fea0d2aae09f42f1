"""Pool storage: own shards beside the controller, memory-mapped read-only loading, knowledge
injection, and clear errors for every damaged or mismatched pool file."""

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM
from modeling_dpsnr import pool_files
from modeling_dpsnr.presets import POOL_STORAGE, PRESETS
from modeling_dpsnr.pool_files import INDEX_NAME, PoolReadOnlyError, PoolStorageError

from conftest import tiny_model

V = 97
COORD = dict(pool_retrieval="coordinate", indexer_window=4, pool_size=400)


def _saved(tmp_path, name="ckpt", seed=0, shard=pool_files.DEFAULT_MAX_SHARD_SIZE, **overrides):
    model = tiny_model(seed, **overrides).eval()
    with torch.no_grad():
        for t in model.pool.entry_parameters():
            t.normal_(std=0.5)  # pool reads matter for the logits
    path = tmp_path / name
    model.save_pretrained(path, pool_max_shard_size=shard)
    return model, path


def _index(path):
    return json.loads((path / INDEX_NAME).read_text())


# ---------------------------------------------------------------------------- format and round trips
def test_pool_lives_in_its_own_shards_beside_the_controller(tmp_path):
    model, path = _saved(tmp_path)
    controller = load_file(path / "model.safetensors")
    assert not any("pool.partitions" in k and k.endswith((".u", ".v")) for k in controller)
    assert any("retriever" in k for k in controller)  # retrieval modules stay with the controller
    index = _index(path)
    assert set(index["tables"]) == {f"{p}.{k}" for p in ("knowledge", "reasoning", "grammar") for k in "uv"}
    for name, info in index["files"].items():  # checksums and sizes recorded at save
        assert info["sha256"] == pool_files.sha256_file(path / name) and info["bytes"] == (path / name).stat().st_size
    with safe_open(path / "pool.safetensors", "pt") as f:  # plain safetensors, readable by the library
        torch.testing.assert_close(f.get_tensor("knowledge.v"), model.pool["knowledge"].v.detach())


@pytest.mark.parametrize("overrides", [dict(), dict(COORD, pool_entry="value")], ids=["product_key", "coordinate"])
def test_normal_and_memory_mapped_loads_equal_the_saved_model(tmp_path, overrides):
    model, path = _saved(tmp_path, **overrides)
    ids = torch.randint(0, V, (2, 7))
    expected = model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(path)
    mapped = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    for m in (loaded, mapped):
        sd, ld = model.state_dict(), m.state_dict()
        assert sd.keys() == ld.keys()
        assert all(torch.equal(sd[k], ld[k]) for k in sd)  # buffers too (RoPE, coordinate stripes)
        torch.testing.assert_close(m(ids).logits, expected)
    assert all(not t.requires_grad for t in mapped.pool.entry_parameters())  # frozen
    assert mapped.lm_head.weight.data_ptr() == mapped.model.embed_tokens.weight.data_ptr()
    out = mapped.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))


def test_a_table_larger_than_a_shard_is_split_and_still_maps_as_one_tensor(tmp_path):
    model, path = _saved(tmp_path, pool_size=4096, pool_partitions={"all": 1.0}, pool_entry="value",
                         pool_topk=3, shard=1 << 17)  # 4096 × 32 × 4 B = 512 KiB in pieces of 128 KiB
    index = _index(path)
    assert len(index["tables"]["all.v"]["pieces"]) == 4 and len(index["files"]) == 4
    mapped = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    assert torch.equal(mapped.pool["all"].v, model.pool["all"].v)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(path).pool["all"].v, model.pool["all"].v)


def test_pool_dtype_can_differ_from_the_controller(tmp_path):
    model, path = _saved(tmp_path, **COORD)
    model.save_pretrained(path, pool_dtype=torch.bfloat16)
    mapped = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    assert mapped.pool["knowledge"].v.dtype == torch.bfloat16 and mapped.lm_head.weight.dtype == torch.float32
    ref = tiny_model(**COORD).eval()
    ref.load_state_dict({k: v.to(torch.bfloat16).float() if ".pool." in k and k.endswith((".u", ".v")) else v
                         for k, v in model.state_dict().items()})
    ids = torch.randint(0, V, (1, 6))
    torch.testing.assert_close(mapped(ids).logits, ref(ids).logits, atol=2e-2, rtol=0)


def test_memory_map_pages_in_only_the_rows_read(tmp_path):
    status = "/proc/self/status"
    if not os.path.exists(status):
        pytest.skip("needs /proc to read resident memory")
    rows, d = 1 << 18, 64  # 64 MiB in float32
    shapes = {"p.v": (rows, d)}
    pool_files.write_pool_files(tmp_path, shapes, torch.float32,
                             lambda name, a, b: torch.arange(a, b, dtype=torch.float32)[:, None].expand(b - a, d), 1 << 30)
    fd = os.open(tmp_path / "pool.safetensors", os.O_RDONLY)
    os.fsync(fd)  # the writer syncs and drops the cache too; start cold whatever it does
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

    def rss_file_kb():
        return next(int(line.split()[1]) for line in open(status) if line.startswith("RssFile"))

    table = pool_files.map_tables(pool_files.check_pool(tmp_path / INDEX_NAME, {"pool.safetensors": tmp_path / "pool.safetensors"}, shapes))["p.v"]
    before = rss_file_kb()
    picks = torch.randint(0, rows, (64,))
    assert torch.equal(table[picks, 0], picks.float())  # the right rows
    grown_kb = rss_file_kb() - before
    assert grown_kb < 64 * 128, grown_kb  # ≤ 128 KiB per row read (MADV_RANDOM), not the 64 MiB file


def test_prefetch_asks_for_exactly_the_pages_of_the_rows_about_to_be_read():
    import mmap

    from modeling_dpsnr.reads import Retrieval

    table = torch.zeros(10_000, 64)  # 256-byte rows
    prefetch = pool_files.Prefetcher([table])
    calls = []
    prefetch.madvise = lambda addr, length, advice: calls.append((addr, length, advice))
    rows = [5, 6, 7, 9000, 9001, 9002, 3]
    prefetch(None, None, Retrieval(torch.tensor([[rows[:3], rows[3:6]], [rows[3:6], [3, 4, 5]]]), torch.ones(2, 2, 3)))
    page = mmap.PAGESIZE
    wanted = {(table.data_ptr() + r * 256 + b) // page for r in rows + [4] for b in (0, 255)}
    got = {p for addr, length, _ in calls for p in range(addr // page, (addr + length) // page)}
    assert got == wanted and all(advice == mmap.MADV_WILLNEED for *_, advice in calls)


def test_streaming_writer_asks_for_rows_in_bounded_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_files, "CHUNK_BYTES", 4096)
    asked = []

    def rows(name, a, b):
        asked.append(b - a)
        return torch.zeros(b - a, 16)

    pool_files.write_pool_files(tmp_path, {"a.v": (1000, 16), "b.v": (37, 16)}, torch.float16, rows, 1 << 20)
    assert max(asked) * 16 * 2 <= 4096 and sum(asked) == 1037


# ---------------------------------------------------------------------------- knowledge injection
def test_written_rows_persist_alone_and_generation_reads_them(tmp_path):
    model, path = _saved(tmp_path, **COORD, pool_entry="value")
    ids = torch.randint(0, V, (1, 5))
    with model.pool.track_usage() as usage:
        before = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    read = usage["knowledge"]["counts"].nonzero().squeeze(-1)
    unread = (usage["knowledge"]["counts"] == 0).nonzero().squeeze(-1)[:5]
    original = {k: v.clone() for k, v in model.state_dict().items()}

    model.write_pool_rows("knowledge", unread, v=torch.full((5, 32), 9.0))
    same = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(same.scores), torch.stack(before.scores))  # rows never read: no effect
    new_rows = torch.randn(read.numel(), 32) * 3
    model.write_pool_rows("knowledge", read, v=new_rows)
    after = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(torch.stack(after.scores), torch.stack(before.scores))  # generation reads them

    model.save_pretrained(path)
    loaded = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    for key, value in loaded.state_dict().items():
        if key.endswith("partitions.knowledge.v"):
            changed = (value != original[key]).any(-1).nonzero().squeeze(-1)
            assert set(changed.tolist()) == set(read.tolist()) | set(unread.tolist())
            torch.testing.assert_close(loaded.read_pool_rows("knowledge", read)["v"], new_rows)
        else:
            assert torch.equal(value, original[key]), key  # the controller and other tables untouched
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_injection_rejects_bad_input_and_memory_mapped_pools(tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(KeyError, match="unknown pool partition"):
        model.write_pool_rows("facts", [0], v=torch.zeros(1, 32))
    with pytest.raises(IndexError, match=r"\[0, "):
        model.write_pool_rows("knowledge", [10_000], v=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="shape"):
        model.write_pool_rows("knowledge", [0, 1], v=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="repeat"):
        model.write_pool_rows("knowledge", [3, 3], v=torch.zeros(2, 32))
    mapped = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    with pytest.raises(PoolReadOnlyError, match="memory-mapped read-only"):
        mapped.write_pool_rows("knowledge", [0], v=torch.zeros(1, 32))


# ---------------------------------------------------------------------------- placement
def test_controller_moves_while_the_pool_stays_on_the_host(tmp_path):
    _, path = _saved(tmp_path, **COORD)
    mapped = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    tables = {id(t): t.data_ptr() for t in mapped.pool.entry_parameters()}
    mapped.place_controller("meta")
    for name, t in list(mapped.named_parameters()) + list(mapped.named_buffers()):
        if id(t) in tables:
            assert t.device.type == "cpu" and t.data_ptr() == tables[id(t)], name  # still the mapping
        else:
            assert t.device.type == "meta", name
    assert mapped.lm_head.weight is mapped.model.embed_tokens.weight  # still tied
    # the same through from_pretrained's device_map (one device for the whole controller)
    placed = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True, device_map="meta")
    assert {t.device.type for t in placed.pool.entry_parameters()} == {"cpu"}
    assert placed.lm_head.weight.device.type == placed.pool["knowledge"].retriever.stripe_start.device.type == "meta"
    with pytest.raises(ValueError, match="device_map"):
        DPSNRForCausalLM.from_pretrained(path, pool_mmap=True, device_map="auto")


def test_pool_read_runs_where_the_tables_are(tmp_path, monkeypatch):
    # No accelerator here: a bfloat16 pool under a float32 controller takes the same path (rows are
    # gathered and summed in the table's device and dtype, the result comes back in the controller's).
    model, path = _saved(tmp_path, **COORD)
    model.save_pretrained(path, pool_dtype=torch.bfloat16)
    mapped = DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    seen = []
    real = torch.nn.functional.embedding_bag

    def spy(idx, table, *args, **kwargs):
        w = kwargs["per_sample_weights"]
        seen.append((idx.device == table.device == w.device, w.dtype == table.dtype == torch.bfloat16))
        out = real(idx, table, *args, **kwargs)
        return out

    monkeypatch.setattr(torch.nn.functional, "embedding_bag", spy)
    out = mapped(torch.randint(0, V, (1, 4)))
    assert seen and all(same_device and table_dtype for same_device, table_dtype in seen)
    assert out.logits.dtype == torch.float32


# ---------------------------------------------------------------------------- faults
def test_missing_pool_files_name_the_file(tmp_path):
    _, path = _saved(tmp_path)
    (path / "pool.safetensors").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="pool.safetensors"):
        DPSNRForCausalLM.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="pool.safetensors"):
        DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)
    (path / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=INDEX_NAME):
        DPSNRForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncated", "header_length", "header_json"])
def test_damaged_pool_files_raise_naming_the_file(tmp_path, damage):
    _, path = _saved(tmp_path)
    shard = path / "pool.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 1000]
    elif damage == "header_length":
        data[:8] = struct.pack("<Q", 10**12)
    else:
        data[8:20] = b"\x00garbage!!\xff\x01"
    shard.write_bytes(bytes(data))
    for mmap in (False, True):
        with pytest.raises(PoolStorageError, match="pool.safetensors"):
            DPSNRForCausalLM.from_pretrained(path, pool_mmap=mmap)
    if damage == "truncated":  # also caught without the index's recorded size
        index = _index(path)
        del index["files"]["pool.safetensors"]["bytes"]
        (path / INDEX_NAME).write_text(json.dumps(index))
        with pytest.raises(PoolStorageError, match="pool.safetensors: truncated"):
            DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)


def test_pool_whose_shape_or_dtype_disagrees_with_the_config(tmp_path):
    _, small = _saved(tmp_path, "small", **COORD)
    _, large = _saved(tmp_path, "large", **dict(COORD, pool_size=500))
    for f in small.glob("pool*"):  # the 400-entry pool beside a 500-entry config
        shutil.copy(f, large / f.name)
    with pytest.raises(PoolStorageError, match=r"pool.safetensors.*shape"):
        DPSNRForCausalLM.from_pretrained(large)

    model, path = _saved(tmp_path, "dtype", **COORD)
    model.save_pretrained(tmp_path / "half", pool_dtype=torch.float16)
    shutil.copy(tmp_path / "half" / "pool.safetensors", path / "pool.safetensors")
    index = _index(path)  # an index re-pointed at the new file, still claiming float32
    index["files"]["pool.safetensors"] = _index(tmp_path / "half")["files"]["pool.safetensors"]
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(PoolStorageError, match=r"pool.safetensors: tensor '.*' is F16 but the pool is F32"):
        DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)


def test_checkpoints_with_the_pool_inside_model_safetensors_still_load(tmp_path):
    from transformers import PreTrainedModel

    model = tiny_model().eval()
    PreTrainedModel.save_pretrained(model, tmp_path)  # transformers' own save: tables in model.safetensors
    assert not (tmp_path / INDEX_NAME).exists()
    loaded = DPSNRForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.pool["knowledge"].v, model.pool["knowledge"].v)
    with pytest.raises(FileNotFoundError, match=INDEX_NAME):  # nothing to map
        DPSNRForCausalLM.from_pretrained(tmp_path, pool_mmap=True)


def test_checksums_are_verified_on_request(tmp_path):
    _, path = _saved(tmp_path)
    shard = path / "pool.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the data: structurally valid
    shard.write_bytes(bytes(data))
    DPSNRForCausalLM.from_pretrained(path, pool_mmap=True)  # only sizes and headers are checked by default
    with pytest.raises(PoolStorageError, match="pool.safetensors: sha256 differs"):
        DPSNRForCausalLM.from_pretrained(path, pool_mmap=True, pool_verify=True)


# ---------------------------------------------------------------------------- hub, tools, presets
def test_push_to_hub_uploads_the_pool_files_too(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    class Repo:
        repo_id = "me/dpsnr"

    uploaded = {}
    monkeypatch.setattr(hub.hf_api(), "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: type("Card", (), {"save": lambda self, p: None})())

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded["files"] = [f for f in os.listdir(working_dir)
                             if f not in files_timestamps or os.path.getmtime(os.path.join(working_dir, f)) > files_timestamps[f]]

    monkeypatch.setattr(DPSNRForCausalLM, "_upload_modified_files", upload)
    tiny_model().save_pretrained(tmp_path / "repo", push_to_hub=True)
    assert {"model.safetensors", "pool.safetensors", INDEX_NAME} <= set(uploaded["files"])


def test_pool_tool_initialises_a_checkpoint_and_grows_it(tmp_path):
    from dpsnr.pool_tool import grow_checkpoint, init_checkpoint, load_config

    config = load_config("debug", {"pool_retrieval": "coordinate", "pool_entry": "value", "indexer_window": 8,
                                   "pool_partitions": {"knowledge": 0.7, "reasoning": 0.2, "grammar": 0.1}})
    index = init_checkpoint(config, tmp_path / "a", torch.bfloat16, max_shard_size=200_000)
    assert len(index["files"]) > 1  # knowledge.v (367 KB) was cut into pieces
    a = DPSNRForCausalLM.from_pretrained(tmp_path / "a", pool_mmap=True, pool_verify=True)
    grow_checkpoint(tmp_path / "a", tmp_path / "b", pool_size=8192)
    b = DPSNRForCausalLM.from_pretrained(tmp_path / "b", pool_mmap=True, pool_verify=True)
    assert b.config.pool_size == 8192
    old, new = a.pool["knowledge"], b.pool["knowledge"]
    # stretched stripes: the first and last row of every head's stripe keep their content
    for (lo, hi), (nlo, nhi) in zip(storage_stripes(old), storage_stripes(new)):
        assert torch.equal(new.v[nlo], old.v[lo]) and torch.equal(new.v[nhi - 1], old.v[hi - 1])
    ids = torch.randint(0, config.vocab_size, (1, 6))
    assert torch.isfinite(b(ids).logits).all()


def storage_stripes(part):
    from modeling_dpsnr.kinds import stripe_bounds

    return stripe_bounds(part.num_entries, part.retriever.heads)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_storage_figures_match_the_config(name):
    cfg = DPSNRConfig.from_preset(name)
    doc = POOL_STORAGE[name]
    assert doc["pool_bytes_16bit"] == pool_files.pool_bytes(cfg, torch.bfloat16) == pool_files.pool_bytes(cfg, torch.float16)
    shards = pool_files.plan_shards(pool_files.pool_table_shapes(cfg), 2, pool_files.parse_size(pool_files.DEFAULT_MAX_SHARD_SIZE))
    assert doc["shards"] == len(shards) and doc["machine"]
