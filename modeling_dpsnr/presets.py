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

PRESETS: dict[str, dict] = {
    # For tests: builds and runs in milliseconds on CPU.
    "debug": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_prelude_layers=1,
        num_attention_heads=4, max_position_embeddings=256,
        pool_size=4096, pool_heads=2, pool_topk=4, pool_key_dim=32, loop_max_steps=4,
    ),
    # CPU demo: d 256, 4 blocks, a 4096-token BPE trained on TinyStories, ~65k neuron entries.
    "micro": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_prelude_layers=2,
        num_attention_heads=4, max_position_embeddings=512,
        pool_size=65536, pool_heads=4, pool_topk=8, pool_key_dim=64, loop_max_steps=4,
    ),
    # d 512, 4 blocks, 8 heads, GPT-2 vocabulary, 100,000 neuron entries 70/20/10, 8 steps.
    # Measured 142.3M total (design: ≈141M) and 14.4M active per token (design: ≈15M); the two
    # design figures cannot both hold exactly, since the fixed parts (102.4M pool + 25.7M
    # embedding) leave ≈13M for the controller if the total is 141M.
    "tiny": dict(),
    # d 768, 8 blocks, GPT-2 vocabulary, ~1M neuron entries.
    "small": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_prelude_layers=3,
        num_attention_heads=12, pool_size=1_048_576, pool_heads=8, pool_topk=8, pool_key_dim=256,
    ),
    # d 1024, 16 blocks, GPT-2 vocabulary, 4M neuron entries.
    "base": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_prelude_layers=6,
        num_attention_heads=16, pool_size=4_194_304, pool_heads=8, pool_topk=16, pool_key_dim=256,
    ),
    # Intermediate coordinate preset: a 0.36B controller (d 1024, 24 blocks) over 10B parameters of
    # value entries (9,765,625 × 1024) read by coordinate windows (8 heads × 32 rows × 8 steps).
    "350m-10b": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_prelude_layers=8,
        num_attention_heads=16, max_position_embeddings=4096,
        pool_size=9_765_625, pool_entry="value", pool_retrieval="coordinate", pool_heads=8,
        indexer_window=32, indexer_hidden_size=2048,
    ),
    # The 1.5B + 100B design: a 1.54B controller (d 2048, 26 blocks, GQA 16/8), a 50.7M learned
    # indexer (3 partitions × 2048→8192→16) and 100.0B parameters of value entries
    # (48,828,125 × 2048) read by coordinate windows (8 heads × 64 rows × 8 steps).
    "1.5b-100b": dict(
        hidden_size=2048, intermediate_size=6912, num_hidden_layers=26, num_prelude_layers=8,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
        pool_size=48_828_125, pool_entry="value", pool_retrieval="coordinate", pool_heads=8,
        indexer_window=64, indexer_hidden_size=8192,
    ),
}

# Measured by `dpsnr presets` (total, active per token at max steps).
MEASURED: dict[str, tuple[int, int]] = {
    "debug": (662_913, 109_953),  # 0.7M total, 0.11M active
    "micro": (38_382_529, 3_845_057),  # 38.4M total (33.6M pool), 3.85M active
    "tiny": (142_295_681, 14_426_241),  # 142.3M total (102.4M pool), 14.43M active
    "small": (1_714_521_345, 66_097_665),  # 1.71B total (1.61B pool), 66.1M active
    "base": (8_861_017_857, 221_717_249),  # 8.86B total (8.59B pool), 221.7M active
    "350m-10b": (10_367_251_505, 317_885_489),  # 10.37B total (10.0B pool, 6.4M indexer), 317.9M active
    "1.5b-100b": (101_589_309_489, 1_494_771_761),  # 101.59B total (100.0B pool, 50.7M indexer), 1.49B active
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
    "micro": dict(pool_bytes_16bit=67_108_864, shards=1, machine="any CPU, 1 GB RAM"),
    "tiny": dict(pool_bytes_16bit=204_800_000, shards=1, machine="any CPU, 4 GB RAM; trains on one GPU or CPU"),
    "small": dict(pool_bytes_16bit=3_221_225_472, shards=1,
                  machine="inference: 8 GB RAM; training: 16 GB accelerator or 32 GB host RAM"),
    "base": dict(pool_bytes_16bit=17_179_869_184, shards=6,
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
