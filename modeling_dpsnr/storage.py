"""Pool-aware checkpoints: how a DPSN-R model saves, loads, maps and places its entry tables.

The file format itself (shards, index, checksums, the memory map and its read-ahead) is in
`pool_files.py`; this module connects it to the model: `PoolStorageMixin` (save_pretrained /
from_pretrained with `pool_mmap` or an offloading `device_map`, `write_pool_rows`, `place_controller`)
and its helpers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from .pool_files import (
    CHUNK_BYTES,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    POOL_TABLE_KEY,
    PoolReadOnlyError,
    Prefetcher,
    _HUB_KWARGS,
    check_pool,
    map_tables,
    parse_size,
    pool_index_fields,
    pool_table_shapes,
    read_header,
    resolve_pool,
    write_pool_files,
)


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------- model-level helpers
@dataclass
class PoolSource:
    """Where a model's pool tables came from (kept on the model as `_pool_source`)."""

    directory: Path
    mmap: bool
    data_ptrs: dict[str, int]  # table → address of its data, to recognise the same tables later


def pool_config(model: nn.Module):
    """The DPSNRConfig describing `model.pool`: the model's config, or `model.pool_config` for models
    that carry a pool beside another architecture (retrofit.py)."""
    return getattr(model, "pool_config", None) or model.config


def model_pool_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{p}.{k}": t for p, part in model.pool.partitions.items() for k, t in part.entry_tables().items()}


def split_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """(controller tensors, pool tables by table name)."""
    controller, pool = {}, {}
    for key, value in state_dict.items():
        m = re.search(POOL_TABLE_KEY, key)
        if m:
            pool[f"{m['part']}.{m['table']}"] = value
        else:
            controller[key] = value
    return controller, pool


def save_pool(model: nn.Module, directory: str | os.PathLike, tables: dict[str, torch.Tensor],
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None) -> dict | None:
    """Write the pool of `model` beside its controller; skipped when `directory` already holds the
    memory-mapped files these very tables come from (saving a mapped model into its own folder)."""
    source: PoolSource | None = getattr(model, "_pool_source", None)
    directory = Path(directory)
    if source is not None and source.mmap and (directory / INDEX_NAME).exists() \
            and os.path.samefile(source.directory, directory) \
            and all(k in tables and tables[k].data_ptr() == ptr for k, ptr in source.data_ptrs.items()) \
            and (dtype is None or dtype == next(iter(tables.values())).dtype):
        return None
    config = pool_config(model)
    shapes = pool_table_shapes(config)
    if set(tables) != set(shapes):
        raise ValueError(f"pool tables {sorted(tables)} do not match the config's {sorted(shapes)}.")
    dtype = dtype or next(iter(tables.values())).dtype
    return write_pool_files(
        directory, shapes, dtype, lambda name, a, b: tables[name][a:b], parse_size(max_shard_size),
        extra=pool_index_fields(config),
    )


def load_pool_into(model: nn.Module, path, mmap_pool: bool = False, verify: bool = False, prefetch: bool = True,
                   **hub_kwargs) -> bool:
    """Fill the model's entry tables from the pool files of checkpoint `path` (copying, in chunks), or
    with `mmap_pool=True` replace them by frozen read-only tensors over the mapped files (with
    `prefetch`, each retrieval first asks the kernel for all its rows: see `Prefetcher`).
    Returns False when the checkpoint has no pool index."""
    found = resolve_pool(path, **hub_kwargs)
    if found is None:
        return False
    pool = check_pool(*found, pool_table_shapes(pool_config(model)), verify=verify)
    mapped = map_tables(pool, random_access=mmap_pool)
    tables = model_pool_tables(model)
    if mmap_pool:
        for name, tensor in mapped.items():
            part_name, kind = name.rsplit(".", 1)
            param = nn.Parameter(tensor, requires_grad=False)
            param._is_hf_initialized = True  # transformers' init functions skip it
            setattr(model.pool.partitions[part_name], kind, param)
        for part in model.pool.partitions.values() if prefetch else ():
            part.attach_prefetcher(Prefetcher(list(part.entry_tables().values())))  # each kind knows when its rows are
        model._pool_source = PoolSource(pool.directory, True, {k: t.data_ptr() for k, t in model_pool_tables(model).items()})
        return True
    with torch.no_grad():
        for name, src in mapped.items():
            dst = tables[name]
            step = max(1, CHUNK_BYTES // (src.shape[1] * src.element_size()))
            for start in range(0, src.shape[0], step):
                dst[start:start + step].copy_(src[start:start + step])
    model._pool_source = PoolSource(pool.directory, False, {k: t.data_ptr() for k, t in tables.items()})
    return True


def checkpoint_has_pool_tables(path, **hub_kwargs) -> bool:
    """Whether the controller weights of checkpoint `path` already hold the entry tables (a
    checkpoint saved before the pool had its own files)."""
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS}
    for name in ("model.safetensors", "model.safetensors.index.json"):
        found = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False, **kwargs)
        if found is None:
            continue
        keys = json.loads(Path(found).read_text())["weight_map"] if name.endswith(".json") else read_header(Path(found))[0]
        return any(re.search(POOL_TABLE_KEY, k) for k in keys)
    return False


def materialize_meta(model: nn.Module, device: str | torch.device = "cpu") -> list[str]:
    """Give every tensor still on the meta device an (uninitialised) home on `device`; shared
    tensors stay shared. Returns their names, for `initialize_weights` to fill."""
    done: dict[int, torch.Tensor] = {}
    names = []
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device=device)
                    done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                    names.append(f"{prefix}.{name}".lstrip("."))
                store[name] = done[id(t)]
    return names


def _load_controller_weights(path, hub: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    single = cached_file(str(path), "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
    if single is not None:
        return load_file(single)
    index = cached_file(str(path), "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index is None:
        raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json) holding the controller.")
    state = {}
    for name in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
        state.update(load_file(cached_file(str(path), name, **hub)))
    return state


def _single_device(device_map) -> torch.device:
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                "pool_mmap=True places the whole controller on one device; got a device_map over several. Drop "
                "pool_mmap to dispatch the controller with accelerate: the pool tables the map offloads ('disk', or "
                "'cpu' beside an accelerator) are memory-mapped from the pool files anyway."
            )
        device_map = devices.pop()
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} is not supported with pool_mmap=True; name one device (e.g. 'cuda:0'), or "
            "drop pool_mmap: the pool tables a device_map offloads ('disk', or 'cpu' beside an accelerator) are "
            "memory-mapped from the pool files anyway."
        )
    return torch.device(device_map)


def pool_table_keys(model: nn.Module) -> list[str]:
    """State-dict names of the entry tables (e.g. "model.loop.pool.partitions.knowledge.u")."""
    return [name for name, _ in model.named_parameters() if re.search(POOL_TABLE_KEY, name)]


def offloaded_pool_tables(model: nn.Module, device_map: dict | None) -> dict[str, str]:
    """The entry tables (state-dict name → "disk" | "cpu") that accelerate offloads under a resolved
    `device_map`, following `accelerate.dispatch_model`: a map over one device other than "disk" is not
    dispatched; "disk" always offloads; "cpu" offloads only beside an accelerator (the main device),
    otherwise it is where the forward runs. A table's device is that of the longest module name that
    contains it (transformers' default for uncovered names: device_map[""] or "cpu")."""
    if not device_map:
        return {}
    devices = {str(d) for d in device_map.values()}
    if len(devices) == 1 and "disk" not in devices:
        return {}
    accelerators = devices - {"cpu", "disk"}
    offloading = {"cpu", "disk"} if accelerators and not all(d.startswith("mps") for d in accelerators) else {"disk"}
    found = {}
    for key in pool_table_keys(model):
        owners = [m for m in device_map if m == "" or key == m or key.startswith(m + ".")]
        device = str(device_map[max(owners, key=len)]) if owners else "cpu"
        if device in offloading:
            found[key] = device
    return found


def check_whole_pool_offloaded(model: nn.Module, device_map: dict) -> None:
    """The pool files are mapped as a whole: refuse a device map that offloads only some of the tables."""
    offloaded = offloaded_pool_tables(model, device_map)
    rest = [k for k in pool_table_keys(model) if k not in offloaded]
    if offloaded and rest:
        raise ValueError(
            f"the device_map offloads the pool tables {sorted(offloaded)} but not {rest}: a pool is memory-mapped "
            "from its files as a whole. Give the whole pool one place in the device_map (e.g. "
            "{'model.loop.pool': 'disk'} to memory-map it, or an accelerator to load it there)."
        )


def map_offloaded_pool(model: nn.Module, path, verify: bool, prefetch: bool, **hub_kwargs) -> None:
    """Serve the tables that accelerate offloads (model.hf_device_map) from the pool's own files.

    accelerate offloads a module by keeping its weights elsewhere (transformers' offload index, or a
    state dict in RAM) and loading them all at every forward: for the pool that means whole tables per
    step, and the index does not even know the pool files. Instead, the partitions' accelerate hooks
    (their only direct tensors are the tables) are removed and the tables are memory-mapped read-only
    from the pool files in host memory, as `pool_mmap=True` does; each read gathers its rows there
    (reads.EntryTables). The retrievers and the rest of the controller stay with accelerate.
    """
    from accelerate.hooks import remove_hook_from_module  # installed whenever transformers dispatched a map

    check_whole_pool_offloaded(model, model.hf_device_map)
    load_pool_into(model, path, mmap_pool=True, verify=verify, prefetch=prefetch, **hub_kwargs)
    # Mapped first: detaching an offload hook moves back the tensors it found off meta (tables transformers
    # allocated after all), which needs them off meta now; for the mapped host tables that move is a no-op.
    for part in model.pool.partitions.values():
        remove_hook_from_module(part)  # not recursive: the retriever keeps its own hook


class PoolStorageMixin:
    """Pool-aware checkpoints for DPSN-R models (a base of `DPSNRPreTrainedModel`).

    - `save_pretrained`: transformers writes the controller (model.safetensors, config, remote
      code); the entry tables go to their own shards (`pool_max_shard_size`, `pool_dtype`).
    - `from_pretrained`: as in transformers, then the tables are filled from the shards. With
      `pool_mmap=True` the tables are never allocated: they are mapped read-only from the shards
      and frozen, so a pool larger than RAM loads; `device_map="cuda:0"` then places only the
      controller. A `device_map` (with `offload_folder` / `max_memory`) that offloads the pool
      ("disk", or "cpu" beside an accelerator) maps the tables the same way and leaves the rest
      of the controller to accelerate (`map_offloaded_pool`). `pool_verify=True` checks every
      shard's sha256 against the index; `pool_prefetch=False` turns off the read-ahead of
      retrieved rows (see `Prefetcher`).
    - `write_pool_rows` / `read_pool_rows`: knowledge injection, an explicit API (DESIGN.md §5).
    - `place_controller(device)`: move everything except the tables.
    """

    _keys_to_ignore_on_load_missing = [POOL_TABLE_KEY]
    _pool_source: PoolSource | None = None

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                        push_to_hub: bool = False, *, pool_max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                        pool_dtype: torch.dtype | None = None, **kwargs):
        if os.path.isfile(save_directory):  # transformers reports it
            return super().save_pretrained(save_directory, is_main_process, state_dict, push_to_hub, **kwargs)
        controller, pool = split_state_dict(self.state_dict() if state_dict is None else state_dict)
        on_rank = self.should_save_on_this_rank(is_main_process) if hasattr(self, "should_save_on_this_rank") else is_main_process
        push = self._prepare_push(save_directory, kwargs) if push_to_hub and on_rank else None
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=controller,
                                push_to_hub=False, **kwargs)
        if on_rank and pool:
            save_pool(self, save_directory, pool, pool_max_shard_size, pool_dtype)
        if push is not None:
            # As transformers' own save_pretrained(push_to_hub=True), but after the pool is written.
            from transformers.utils.hub import create_and_tag_model_card

            card = create_and_tag_model_card(push["repo_id"], self.model_tags, token=kwargs.get("token"))
            card.save(os.path.join(save_directory, "README.md"))
            self._upload_modified_files(save_directory, push["repo_id"], push["timestamps"], token=kwargs.get("token"),
                                        commit_message=push["commit_message"], create_pr=push["create_pr"])

    def _prepare_push(self, save_directory, kwargs: dict) -> dict:
        from transformers.utils.hub import hf_api

        os.makedirs(save_directory, exist_ok=True)
        push = {"commit_message": kwargs.pop("commit_message", None), "create_pr": kwargs.pop("create_pr", False)}
        repo_id = kwargs.pop("repo_id", os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1])
        own = {"max_shard_size", "variant", "token", "save_peft_format", "save_original_format", "distributed_checkpoint",
               "safe_serialization"}
        repo_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in own}
        push["repo_id"] = hf_api().create_repo(repo_id, exist_ok=True, token=kwargs.get("token"), **repo_kwargs).repo_id
        push["timestamps"] = self._get_files_timestamps(save_directory)
        return push

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, pool_mmap: bool = False,
                        pool_verify: bool = False, pool_prefetch: bool = True, **kwargs):
        if pool_mmap:
            return cls._from_pretrained_mmap(pretrained_model_name_or_path, model_args, pool_verify, pool_prefetch, kwargs)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        result = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            path = pretrained_model_name_or_path
            if offloaded_pool_tables(model, getattr(model, "hf_device_map", None)) and resolve_pool(path, **hub):
                map_offloaded_pool(model, path, pool_verify, pool_prefetch, **hub)
            # (Tables kept inside model.safetensors by older checkpoints are offloaded by accelerate itself.)
            elif not model.load_pool(path, verify=pool_verify, **hub) and not checkpoint_has_pool_tables(path, **hub):
                raise FileNotFoundError(
                    f"{os.path.join(os.fspath(path), hub.get('subfolder') or '', INDEX_NAME)} is missing: the checkpoint "
                    "holds neither pool shards nor pool tables in its weights, so the pool would be random."
                )
        return result

    @classmethod
    def _from_pretrained_mmap(cls, path, model_args: tuple, verify: bool, prefetch: bool, kwargs: dict):
        """Controller from model.safetensors, tables memory-mapped: the pool is never allocated.

        Built on the meta device; controller tensors are assigned from the checkpoint and marked
        initialised; the tables are mapped; what remains on meta (non-persistent buffers such as
        the RoPE frequencies and the coordinate stripes) gets memory and transformers'
        `initialize_weights` fills exactly those.
        """
        if model_args:
            raise TypeError("from_pretrained(pool_mmap=True) takes no extra positional model arguments.")
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        config = kwargs.pop("config", None)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device_map = kwargs.pop("device_map", None)
        for harmless in ("trust_remote_code", "_from_auto", "_from_pipeline", "use_safetensors", "low_cpu_mem_usage", "adapter_kwargs"):
            kwargs.pop(harmless, None)
        if config is None:
            config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **hub, **kwargs)
        if kwargs:
            raise TypeError(f"from_pretrained(pool_mmap=True) got unsupported arguments {sorted(kwargs)}.")
        with torch.device("meta"):
            model = cls(config)
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
        state = _load_controller_weights(path, hub)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(f"{path}: the controller weights hold tensors this config has no place for: {result.unexpected_keys[:8]}.")
        tensors = model.state_dict(keep_vars=True)
        for key in state:
            tensors[key]._is_hf_initialized = True
        model.tie_weights()
        if not model.load_pool(path, mmap=True, verify=verify, prefetch=prefetch, **hub):
            raise FileNotFoundError(f"{path}: no {INDEX_NAME}; pool_mmap=True needs the pool in its own files (re-save with save_pretrained).")
        missing = [k for k in result.missing_keys if not re.search(POOL_TABLE_KEY, k) and tensors[k].is_meta
                   and k not in getattr(model, "all_tied_weights_keys", {})]
        if missing:
            logger.warning(f"Weights not in the checkpoint {path}, newly initialised: {missing}.")
        materialize_meta(model, "cpu")
        model.initialize_weights()
        model.eval()
        if getattr(model, "can_generate", lambda: False)():
            from transformers import GenerationConfig

            try:
                model.generation_config = GenerationConfig.from_pretrained(path, **hub)
            except OSError:
                pass
        if device_map is not None:
            model.place_controller(_single_device(device_map))
        return model

    def _move_missing_keys_from_meta_to_device(self, missing_keys, device_map, *args, **kwargs):
        # transformers' loader gives every tensor missing from model.safetensors memory on its mapped device
        # (disk → cpu) and initialises it. The pool tables a device map offloads are memory-mapped from
        # the pool files once loading is done (`map_offloaded_pool`), so they stay on meta: a pool larger
        # than RAM is never allocated, nor filled with random values first. (A transformers internal,
        # the same in 5.23 and 5.24; were it renamed, the tables would only be allocated in passing.)
        offloaded = offloaded_pool_tables(self, device_map)
        if any(k in offloaded for k in missing_keys):  # they come from the pool files
            check_whole_pool_offloaded(self, device_map)  # before anything is allocated or dispatched
        missing_keys = type(missing_keys)(k for k in missing_keys if k not in offloaded)
        return super()._move_missing_keys_from_meta_to_device(missing_keys, device_map, *args, **kwargs)

    def load_pool(self, path, mmap: bool = False, verify: bool = False, prefetch: bool = True, **hub_kwargs) -> bool:
        """Load the pool shards of checkpoint `path` into this model (see `load_pool_into`); False if
        it has none. Trainers resuming from a checkpoint call this after loading model.safetensors."""
        return load_pool_into(self, path, mmap_pool=mmap, verify=verify, prefetch=prefetch, **hub_kwargs)

    # ------------------------------------------------------------------ knowledge injection
    @torch.no_grad()
    def write_pool_rows(self, partition: str, indices, u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        """Overwrite rows `indices` of `partition` with new entries (u: neuron keys, v: values), in
        place; nothing else changes. `save_pretrained` then persists them beside an unchanged controller."""
        source = self._pool_source
        if source is not None and source.mmap:
            raise PoolReadOnlyError(
                f"the pool is memory-mapped read-only from {source.directory}; load it with pool_mmap=False to write rows."
            )
        part = self._pool_partition(partition)
        idx = self._pool_indices(part, indices)
        tables = part.entry_tables()
        if u is None and v is None:
            raise ValueError("write_pool_rows needs u and/or v.")
        for kind, rows in (("u", u), ("v", v)):
            if rows is None:
                continue
            if kind not in tables:
                raise ValueError(f"partition {partition!r} stores no {kind!r} table (pool_entry={pool_config(self).pool_entry!r}).")
            rows = torch.as_tensor(rows)
            table = tables[kind]
            if tuple(rows.shape) != (idx.numel(), table.shape[1]):
                raise ValueError(f"{kind} must have shape {(idx.numel(), table.shape[1])} (rows × hidden_size), got {tuple(rows.shape)}.")
            if not torch.isfinite(rows).all():
                raise ValueError(f"{kind} holds non-finite values.")
            table[idx.to(table.device)] = rows.to(device=table.device, dtype=table.dtype)

    @torch.no_grad()
    def read_pool_rows(self, partition: str, indices) -> dict[str, torch.Tensor]:
        """Copies of rows `indices` of `partition`'s tables, by table ("u", "v")."""
        part = self._pool_partition(partition)
        idx = self._pool_indices(part, indices)
        return {k: t[idx.to(t.device)].clone() for k, t in part.entry_tables().items()}

    def _pool_partition(self, partition: str):
        if partition not in self.pool.partitions:
            raise KeyError(f"unknown pool partition {partition!r}; partitions: {list(self.pool.partitions)}.")
        return self.pool.partitions[partition]

    @staticmethod
    def _pool_indices(part, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"indices must be a 1-D integer tensor or list, got {tuple(idx.shape)} {idx.dtype}.")
        idx = idx.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= part.num_entries):
            raise IndexError(f"indices must lie in [0, {part.num_entries}) for partition {part.name!r}.")
        if idx.unique().numel() != idx.numel():
            raise ValueError("indices repeat a row: each row can be written once per call.")
        return idx

    # ------------------------------------------------------------------ placement
    def place_controller(self, device: str | torch.device):
        """Move every parameter and buffer except the pool's entry tables to `device`.

        The tables stay where they are (host memory, a memory map): each read gathers its rows
        there and only the (n, d) result travels to the controller's device.
        """
        device = torch.device(device)
        tables = {id(t) for t in model_pool_tables(self).values()}
        moved: dict[int, torch.Tensor] = {}
        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is None or id(t) in tables:
                        continue
                    if id(t) not in moved:
                        new = t.data.to(device)
                        moved[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                    store[name] = moved[id(t)]
        return self
