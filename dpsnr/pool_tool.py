"""Create, grow and verify large pools on disk without ever holding a table in memory.

    dpsnr pool-tool init   --preset PRESET|PATH --out DIR [--dtype bfloat16] [--shards N]
                           [--config_overrides '{pool_size: 1048576}'] [--pool-only]
    dpsnr pool-tool grow   --src DIR --out DIR --pool-size N
    dpsnr pool-tool verify --dir DIR

`init` streams randomly initialised tables into pool shards (chunks of CHUNK_BYTES) and, unless
--pool-only, saves a freshly initialised controller beside them: a checkpoint that
`from_pretrained(DIR, pool_mmap=True)` opens with a few hundred MB of RAM.

`grow` writes a larger pool from an existing one, chunk by chunk, partition by partition, as the
partition's retrieval kind addresses its rows (kinds.py):
- kinds that address rows by relative position in a head's stripe (coordinate): each stripe is
  stretched. Row j of the new stripe copies the old row at the same relative position, so μ (a
  relative position, predicted by an indexer that does not depend on N) still lands on the same
  content. σ is measured in rows, so a window now spans fewer distinct old rows and outputs shift
  somewhat; the duplicated rows diverge with training.
- the others (product keys, exhaustive, hashed n-grams): old rows keep their indices and new rows are
  random. Kinds whose parameters follow the pool size (product keys' sub-key tables) change shape, so
  load the grown checkpoint with `from_pretrained(DIR, ignore_mismatched_sizes=True)`; transformers
  re-initialises them.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling_dpsnr import DPSNRConfig, DPSNRForCausalLM
from modeling_dpsnr.kinds import stripe_bounds
from modeling_dpsnr.pool_files import (
    DEFAULT_MAX_SHARD_SIZE, check_pool, map_tables, parse_size, pool_bytes, pool_index_fields, pool_table_shapes,
    resolve_pool, write_pool_files,
)
from modeling_dpsnr.storage import materialize_meta


def load_config(spec: str, overrides: dict | None = None) -> DPSNRConfig:
    """A preset name, a config.json, or a checkpoint directory; `overrides` set fields (validated)."""
    overrides = dict(overrides or {})
    if not Path(spec).exists():
        return DPSNRConfig.from_preset(spec, **overrides)
    base = DPSNRConfig.from_pretrained(spec).to_dict()
    base.update(overrides)
    if ("loop_max_steps" in overrides or "pool_partitions" in overrides) and "loop_phase_schedule" not in overrides:
        base.pop("loop_phase_schedule", None)  # the saved schedule belongs to the old steps/partitions
    return DPSNRConfig.from_dict(base)


def random_rows(config: DPSNRConfig, seed: int):
    """Row source of N(0, pool_init_std) entries; a chunk's seed is derived from its table and
    first row, so a pool is reproducible for a given seed and chunk size."""
    std = config.pool_init_std or config.initializer_range
    names = list(pool_table_shapes(config))

    def rows(name: str, start: int, stop: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + names.index(name) * 7_919 + start)
        return torch.randn(stop - start, config.hidden_size, generator=g) * std

    return rows


def init_checkpoint(config: DPSNRConfig, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, seed: int = 0, pool_only: bool = False) -> dict:
    """Stream a random pool into `out`; unless `pool_only`, add a fresh controller (config, weights, code)."""
    index = write_pool_files(Path(out), pool_table_shapes(config), dtype, random_rows(config, seed),
                             parse_size(max_shard_size), extra=pool_index_fields(config))
    if not pool_only:
        init_controller(config, out, seed)
    return index


def init_controller(config: DPSNRConfig, out: str | Path, seed: int = 0) -> None:
    """Save a freshly initialised controller for `config` beside the pool files already in `out`.
    The tables are mapped from those files, never allocated, and `save_pretrained` leaves them."""
    with torch.device("meta"):
        model = DPSNRForCausalLM(config)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    model.load_pool(out, mmap=True)
    materialize_meta(model, "cpu")
    torch.manual_seed(seed)
    model.initialize_weights()
    model.save_pretrained(out)


def grow_checkpoint(src: str | Path, out: str | Path, pool_size: int, seed: int = 0,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> DPSNRConfig:
    """Write a checkpoint with `pool_size` entries into `out` from the one in `src` (see module doc)."""
    src, out = Path(src), Path(out)
    old = DPSNRConfig.from_pretrained(str(src))
    if pool_size < old.pool_size:
        raise ValueError(f"grow only enlarges a pool: {pool_size} < current {old.pool_size}.")
    new = load_config(str(src), {"pool_size": pool_size})
    found = resolve_pool(src)
    if found is None:
        raise FileNotFoundError(f"{src} has no pool index to grow.")
    old_tables = map_tables(check_pool(*found, pool_table_shapes(old)), random_access=False)
    fresh = random_rows(new, seed)
    old_sizes, new_sizes = old.partition_sizes(), new.partition_sizes()

    def rows(name: str, start: int, stop: int) -> torch.Tensor:
        part = name.rsplit(".", 1)[0]
        j = torch.arange(start, stop, dtype=torch.int64)
        if new.partition_kind(part).keeps_relative_positions:
            return old_tables[name][_stretch(j, old_sizes[part], new_sizes[part], new.pool_heads)].float()
        block = fresh(name, start, stop)
        keep = j < old_sizes[part]
        if keep.any():
            block[keep] = old_tables[name][j[keep]].float()
        return block

    dtype = getattr(torch, json.loads(found[0].read_text())["dtype"])
    write_pool_files(out, pool_table_shapes(new), dtype, rows, parse_size(max_shard_size), extra=pool_index_fields(new))
    for f in src.iterdir():  # controller weights and remote code are unchanged
        if f.name.startswith("model.safetensors") or f.suffix == ".py" or f.name == "generation_config.json":
            shutil.copy2(f, out / f.name)
    new.save_pretrained(str(out))
    return new


def _stretch(j: torch.Tensor, old_n: int, new_n: int, heads: int) -> torch.Tensor:
    """Old row at the same relative position of the same head stripe as new row j."""
    old_b = torch.tensor(stripe_bounds(old_n, heads), dtype=torch.float64)  # (H, 2)
    new_b = torch.tensor(stripe_bounds(new_n, heads), dtype=torch.float64)
    h = torch.searchsorted(new_b[:, 1].contiguous(), j.double(), right=True).clamp(max=heads - 1)
    rel = (j.double() - new_b[h, 0]) / (new_b[h, 1] - new_b[h, 0] - 1).clamp(min=1)
    return (old_b[h, 0] + torch.round(rel * (old_b[h, 1] - old_b[h, 0] - 1))).long()


# ---------------------------------------------------------------------------- CLI
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class InitArguments:
    """Stream a random pool (and a fresh controller) into a checkpoint folder."""

    preset: str = field(metadata={"help": "Preset name, config.json or checkpoint folder."})
    out: str = field(metadata={"help": "Folder to write."})
    dtype: str = field(default="bfloat16", metadata={"choices": DTYPES})
    shards: int | None = field(default=None, metadata={"help": "About this many shards (default: shards of 5 GB)."})
    config_overrides: str | None = field(default=None, metadata={"help": "Config fields as a YAML mapping, e.g. '{pool_size: 1048576}'."})
    seed: int = 0
    pool_only: bool = field(default=False, metadata={"help": "Write the pool shards only."})


@dataclass
class GrowArguments:
    """Write a larger pool from an existing checkpoint."""

    src: str = field(metadata={"help": "Checkpoint folder to grow."})
    out: str = field(metadata={"help": "Folder to write."})
    pool_size: int = field(metadata={"help": "Entries of the new pool (all partitions)."})
    seed: int = 0


@dataclass
class VerifyArguments:
    """Check every pool shard (headers, sizes, sha256) against the config."""

    dir: str = field(metadata={"help": "Checkpoint folder."})


def _init(args: InitArguments) -> dict:
    import yaml

    overrides = yaml.safe_load(args.config_overrides) if args.config_overrides else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"--config_overrides must be a mapping of config fields, got {args.config_overrides!r}")
    config = load_config(args.preset, overrides)
    dtype = getattr(torch, args.dtype)
    size = math.ceil(pool_bytes(config, dtype) / args.shards) if args.shards else DEFAULT_MAX_SHARD_SIZE
    index = init_checkpoint(config, args.out, dtype, size, args.seed, args.pool_only)
    return {"out": args.out, "shards": len(index["files"]), "pool_bytes": pool_bytes(config, dtype)}


def _grow(args: GrowArguments) -> dict:
    new = grow_checkpoint(args.src, args.out, args.pool_size, args.seed)
    if any(new.partition_kind(p).size_shaped_parameters for p in new.pool_partitions):
        print("product-key sub-keys change shape with the pool: load with ignore_mismatched_sizes=True", file=sys.stderr)
    return {"out": args.out, "pool_size": new.pool_size}


def _verify(args: VerifyArguments) -> dict:
    config = DPSNRConfig.from_pretrained(args.dir)
    found = resolve_pool(args.dir)
    if found is None:
        raise FileNotFoundError(f"{args.dir}: no pool index")
    pool = check_pool(*found, pool_table_shapes(config), verify=True)
    return {"dir": args.dir, "verified_shards": len(pool.paths)}


ACTIONS = {"init": (InitArguments, _init), "grow": (GrowArguments, _grow), "verify": (VerifyArguments, _verify)}


def main(argv: list[str] | None = None) -> dict:
    """`init | grow | verify` and that action's flags; prints one JSON line."""
    from dpsnr.scripting import parse_dataclasses

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ACTIONS:
        lines = [f"  {name:<7} {types.__doc__}" for name, (types, _) in ACTIONS.items()]
        message = "usage: dpsnr pool-tool {init,grow,verify} [--help | flags]\n" + "\n".join(lines)
        if argv and argv[0] in ("-h", "--help"):
            print(message)
            raise SystemExit(0)
        raise SystemExit(message + f"\nunknown action {argv[0]!r}" if argv else message)
    arguments, action = ACTIONS[argv[0]]
    (args,) = parse_dataclasses((arguments,), argv[1:], description=arguments.__doc__)
    record = action(args)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
