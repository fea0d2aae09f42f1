"""Named DPSN-R presets. Each states only what differs from `DPSNRConfig`'s defaults (which are
the `tiny` architecture) and is commented with its measured size.

"total" counts every parameter once (the LM head is tied to the embedding); "active" is what one
token touches at the maximum number of reasoning steps: non-embedding controller parameters,
the loop's own modules (queries, sub-keys, gate, halting head) and steps × heads × k entries.
`tests/test_presets.py` instantiates every preset (on the meta device for the large ones) and
checks both numbers against `MEASURED` below; `dpsnr presets` measures and prints them
(`DPSNRForCausalLM.count_parameters`).

Data only: this module imports nothing of the package, so the config can read it at import time.
"""

from __future__ import annotations

import copy

# The loop and the pool the loop/pool study chose on micro (docs/results.md, eval/results/study.json;
# main-job recipe, both datasets): the block step (attention at each depth) run for every step, and
# for product keys one shared pool with running-statistics query norm and unit keys (rows read
# 35 % -> 56 % on TinyStories, lower perplexity than three partitions). Routed halting
# (loop_halting="threshold", 2.5 of 4 steps) cost 7-11 % perplexity against every step at equal
# tokens, for ~10 % fewer FLOPs: it is an option, not the default. Trained exits (loop_halting="exits",
# loop_ponder_weight=0.1, loop_exit_threshold=0.4) match every step at 2.3-2.5 mean steps on fresh text
# (study rows F-exits, two seeds per dataset) but not on the main job, where two runs that differ only
# in rounding scored 29.72 and 31.54 at q = 0.5 (sliding windows) against every step's 30.25 (the
# every-step main job reruns exactly), the second with 58.6 % of
# the pool read instead of 68.1 %; and they train every step plus the coda and LM head on each exit (0.61x
# the training speed): an option too. DPSNRConfig's own defaults keep the first design, so configs saved
# before these fields existed load as they were trained.
BLOCK_LOOP = dict(loop_step="block", loop_halting="fixed")
SHARED_PRODUCT_KEYS = dict(pool_partitions={"shared": 1.0}, pool_query_norm="running", pool_key_norm="unit")
# micro only (the main job's preset): a hashed n-gram partition of a quarter of the product-key
# entries, looked up from the last 2 and 3 token ids and read once in the prelude (hashed.py).
# Measured on micro (study row F-fixed4-hashed, 716,800 tokens, seeds 42 and 7): held-out
# perplexity -9.5 % TinyStories, -7.9 % WikiText-2, and the product-key rows read rise
# (56 % -> 65 % TinyStories); the main job 35.23 -> 30.64. The larger presets keep a pool that
# any input can query: this partition needs input_ids (it hashes them), so inputs_embeds-only
# calls (e.g. PEFT prompt tuning) would fail on it; it is one override away (`hashed_prelude(N)`).
def hashed_prelude(product_key_entries: int) -> dict:
    """Config fields that add a hashed n-gram partition of product_key_entries / 4 rows, read in the
    prelude, beside one shared product-key pool of `product_key_entries` rows that every loop step
    reads (the derived schedule leaves the prelude's partition out, at any loop_max_steps)."""
    return dict(pool_size=product_key_entries * 5 // 4, pool_partitions={"shared": 0.8, "ngram": 0.2},
                pool_partition_retrieval={"ngram": "hashed_ngram"}, ngram_prelude_partition="ngram")


PRESETS: dict[str, dict] = {
    # For tests: builds and runs in milliseconds on CPU.
    "debug": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_prelude_layers=1,
        num_attention_heads=4, max_position_embeddings=256,
        pool_size=4096, pool_heads=2, pool_topk=4, pool_key_dim=32, loop_max_steps=4,
        **BLOCK_LOOP, **SHARED_PRODUCT_KEYS,
    ),
    # CPU demo: d 256, 4 blocks, a 4096-token BPE trained on TinyStories, 65,536 neuron entries read by
    # product keys and 16,384 hashed n-gram rows read in the prelude.
    "micro": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_prelude_layers=2,
        num_attention_heads=4, max_position_embeddings=512,
        pool_heads=4, pool_topk=8, pool_key_dim=64, loop_max_steps=4,
        **BLOCK_LOOP, **{**SHARED_PRODUCT_KEYS, **hashed_prelude(65536)},
    ),
    # d 512, 4 blocks, 8 heads, GPT-2 vocabulary, 100,000 neuron entries in one shared pool (the
    # design's 70/20/10 split is `pool_partitions`; the study measured the shared pool better), 8 steps.
    # Measured 142.7M total (design: ≈141M, +1.2 %) and 14.9M active per token (design: ≈15M).
    "tiny": dict(**BLOCK_LOOP, **SHARED_PRODUCT_KEYS),
    # d 768, 8 blocks, GPT-2 vocabulary, ~1M neuron entries.
    "small": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_prelude_layers=3,
        num_attention_heads=12, pool_size=1_048_576, pool_heads=8, pool_topk=8, pool_key_dim=256,
        **BLOCK_LOOP, **SHARED_PRODUCT_KEYS,
    ),
    # d 1024, 16 blocks, GPT-2 vocabulary, 4M neuron entries.
    "base": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_prelude_layers=6,
        num_attention_heads=16, pool_size=4_194_304, pool_heads=8, pool_topk=16, pool_key_dim=256,
        **BLOCK_LOOP, **SHARED_PRODUCT_KEYS,
    ),
    # Intermediate coordinate preset: a 0.36B controller (d 1024, 24 blocks) over 10B parameters of
    # value entries (9,765,625 × 1024) read by coordinate windows (8 heads × 32 rows × 8 steps).
    "350m-10b": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_prelude_layers=8,
        num_attention_heads=16, max_position_embeddings=4096,
        pool_size=9_765_625, pool_entry="value", pool_retrieval="coordinate", pool_heads=8,
        indexer_window=32, indexer_hidden_size=2048, **BLOCK_LOOP,
    ),
    # The 1.5B + 100B design: a 1.54B controller (d 2048, 26 blocks, GQA 16/8), a 50.7M learned
    # indexer (3 partitions × 2048→8192→16) and 100.0B parameters of value entries
    # (48,828,125 × 2048) read by coordinate windows (8 heads × 64 rows × 8 steps).
    "1.5b-100b": dict(
        hidden_size=2048, intermediate_size=6912, num_hidden_layers=26, num_prelude_layers=8,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
        pool_size=48_828_125, pool_entry="value", pool_retrieval="coordinate", pool_heads=8,
        indexer_window=64, indexer_hidden_size=8192, **BLOCK_LOOP,
    ),
}

# Measured by `dpsnr presets` (total, active per token at max steps).
MEASURED: dict[str, tuple[int, int]] = {
    "debug": (668_544, 115_584),  # 0.7M total, 0.12M active
    "micro": (42_800_264, 4_070_536),  # 42.8M total (33.6M product-key pool, 4.2M hashed n-gram rows), 4.07M active
    "tiny": (142_722_560, 14_853_120),  # 142.7M total (102.4M pool), 14.85M active
    "small": (1_712_475_136, 64_051_456),  # 1.71B total (1.61B pool), 64.1M active
    "base": (8_858_499_584, 219_198_976),  # 8.86B total (8.59B pool), 219.2M active
    "350m-10b": (10_371_445_808, 322_079_792),  # 10.37B total (10.0B pool, 6.4M indexer), 322.1M active
    "1.5b-100b": (101_601_892_400, 1_507_354_672),  # 101.60B total (100.0B pool, 50.7M indexer), 1.51B active
}

# Pool on disk (pool_files.py): bytes in fp16 = bf16 (2 per parameter; fp32 doubles them), the shard
# count `save_pretrained` writes at its default pool_max_shard_size="5GB" (tables above 5 GB are
# cut by rows), and the machine each preset needs. Inference can keep the pool memory-mapped
# (`from_pretrained(path, pool_mmap=True)`): RAM then holds the controller plus the pages read,
# and the disk holds the pool. Training holds the pool in memory in fp32 with the row-wise sparse
# Adam of training/pool_optim.py (≈ one more pool of first moments + one scalar per row).
# `tests/test_storage.py` recomputes the bytes and shard counts from the presets.
POOL_STORAGE: dict[str, dict] = {
    "debug": dict(pool_bytes_16bit=1_048_576, shards=1, machine="any CPU; tests"),
    "micro": dict(pool_bytes_16bit=75_497_472, shards=1, machine="any CPU, 1 GB RAM"),
    "tiny": dict(pool_bytes_16bit=204_800_000, shards=1, machine="any CPU, 4 GB RAM; trains on one GPU or CPU"),
    "small": dict(pool_bytes_16bit=3_221_225_472, shards=1,
                  machine="inference: 8 GB RAM; training: 16 GB accelerator or 32 GB host RAM"),
    "base": dict(pool_bytes_16bit=17_179_869_184, shards=4,
                 machine="inference: 8 GB RAM + 18 GB disk (pool_mmap); training: 80 GB accelerator, or 96 GB host RAM"),
    "350m-10b": dict(pool_bytes_16bit=20_000_000_000, shards=5,
                     machine="inference: 4 GB RAM + 20 GB SSD (pool_mmap; a 20 GB pool under a micro controller "
                             "peaked at 0.42 GB RSS, eval/bench_pool_scale.py); training: 2× 80 GB GPUs or 128 GB host RAM"),
    "1.5b-100b": dict(pool_bytes_16bit=200_000_000_000, shards=43,
                      machine="inference: one 16 GB GPU for the bf16 controller (3.1 GB) + 16 GB host RAM + "
                              "200 GB NVMe for the memory-mapped pool; training: ≥ 8× 80 GB GPUs with the pool "
                              "row-sharded (400 GB fp32 + moments) or ≥ 1 TB host RAM"),
}


def preset_kwargs(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])
