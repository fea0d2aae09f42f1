"""The pool's file format: the entry tables in their own safetensors shards, beside the controller.

    save_directory/
      config.json, generation_config.json, *.py   (remote code)
      model.safetensors                  the controller: every tensor except the pool's entry tables
      pool.safetensors.index.json        table → pieces (file, rows); dtype; bytes + sha256 per file
      pool.safetensors                   a small pool in one file, or
      pool-00001-of-00040.safetensors    shards of at most `pool_max_shard_size` bytes

Tables are named "{partition}.{u|v}". Every shard is a plain safetensors file (8-byte little-endian
header length, JSON header, raw little-endian data) that `safetensors.safe_open` reads. Small tables
are packed together; a table larger than a shard is cut by rows into pieces, each alone in its file.
The writer pads each header so data starts on a 64 KiB boundary and cuts pieces at multiples of
64 KiB, so the pieces of one table can be mapped back to back into one address range (any page
size up to 64 KiB) and the table stays one tensor.

Why not `safetensors.torch.save_file`: it needs each tensor whole in memory. `write_pool_files`
pulls rows chunk by chunk from a function and hashes while writing, so a 100B-parameter pool is
written with a few chunks of RAM (DESIGN.md §5).

Why an own reader: `safe_open` copies tensors out. Here a shard is mapped copy-on-write
(MAP_PRIVATE: the file never changes) with MADV_RANDOM, so only the pages of rows actually read
enter memory. Without the advice the kernel reads ahead and maps whole page-cache folios: measured
on Linux 6.18, 1.5 MB of resident memory per random 512-byte read against 32 KB with it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


INDEX_NAME = "pool.safetensors.index.json"
FORMAT = "dpsnr-pool"
VERSION = 1
ALIGN = 1 << 16  # data offsets and piece boundaries: a multiple of every common page size
CHUNK_BYTES = 64 << 20  # rows moved per write / copy step
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DEFAULT_MAX_SHARD_SIZE = "5GB"
# State-dict keys of the entry tables (model.loop.pool.partitions.<name>.<u|v>), matched by re.search.
POOL_TABLE_KEY = r"loop\.pool\.partitions\.(?P<part>[^.]+)\.(?P<table>[uv])$"
_SHARD_NAME = re.compile(r"pool(-\d{5}-of-\d{5})?\.safetensors")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class PoolStorageError(ValueError):
    """A pool file is damaged, or disagrees with its index or with the model's configuration."""


class PoolReadOnlyError(RuntimeError):
    """A write into a pool that is memory-mapped read-only."""


def parse_size(size: int | str) -> int:
    """"5GB" → 5·10⁹ bytes, "512MiB" → 512·2²⁰ (the units transformers' max_shard_size accepts)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"pool_max_shard_size must be bytes or like '5GB', got {size!r}.")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def pool_table_shapes(config) -> dict[str, tuple[int, int]]:
    """The (rows, hidden_size) of every entry table the config implies, in partition order."""
    return {f"{p}.{k}": (n, config.hidden_size) for p, n in config.partition_sizes().items()
            for k in config.partition_tables(p)}


def pool_index_fields(config) -> dict:
    """What the index records of the config beside the tables (for people and tools reading the files)."""
    return {"hidden_size": config.hidden_size, "pool_entry": config.pool_entry, "partitions": config.partition_sizes()}


def pool_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(r * d for r, d in pool_table_shapes(config).values()) * itemsize


# ---------------------------------------------------------------------------- writing
@dataclass
class Piece:
    table: str
    start: int
    stop: int


def plan_shards(shapes: dict[str, tuple[int, int]], itemsize: int, max_shard_bytes: int) -> list[list[Piece]]:
    """Pack whole tables into shards of ≤ max_shard_bytes; cut larger tables into aligned pieces."""
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for name, (rows, d) in shapes.items():
        row_bytes = d * itemsize
        if rows * row_bytes <= max_shard_bytes:
            if current and used + rows * row_bytes > max_shard_bytes:
                shards.append(current)
                current, used = [], 0
            current.append(Piece(name, 0, rows))
            used += rows * row_bytes
            continue
        if current:
            shards.append(current)
            current, used = [], 0
        unit = ALIGN // math.gcd(row_bytes, ALIGN)  # rows per piece: a multiple of this keeps pieces aligned
        step = max(unit, max_shard_bytes // row_bytes // unit * unit)
        shards.extend([Piece(name, s, min(rows, s + step))] for s in range(0, rows, step))
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    return ["pool.safetensors"] if count == 1 else [f"pool-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(entries: dict, metadata: dict[str, str]) -> bytes:
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    pad = -(8 + len(raw)) % ALIGN  # safetensors allows trailing spaces in the header
    return struct.pack("<Q", len(raw) + pad) + raw + b" " * pad


def _raw_bytes(t: torch.Tensor):
    """A zero-copy buffer over a contiguous CPU tensor (stdlib only; numpy has no bfloat16)."""
    return (ctypes.c_uint8 * (t.numel() * t.element_size())).from_address(t.data_ptr())


RowSource = Callable[[str, int, int], torch.Tensor]  # (table, start, stop) → rows start:stop


def write_pool_files(
    directory: str | os.PathLike,
    shapes: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    rows: RowSource,
    max_shard_bytes: int,
    extra: dict | None = None,
) -> dict:
    """Stream every table into shards under `directory`, then write the index; returns the index.

    Rows come from `rows(table, start, stop)` at most CHUNK_BYTES at a time, so no table is ever
    whole in memory. Each shard is written to a temporary name and renamed: a pool that is
    memory-mapped from the same directory keeps its old inode. Shards of an earlier save that the
    new index no longer names are removed.
    """
    if sys.byteorder != "little":
        raise RuntimeError("pool files are little-endian; writing them on a big-endian host is not supported.")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"pool dtype must be one of {list(_DTYPE_CODES)}, got {dtype}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(shapes, itemsize, max_shard_bytes)
    tables = {name: {"shape": list(shape), "pieces": []} for name, shape in shapes.items()}
    files = {}
    for fname, pieces in zip(shard_names(len(shards)), shards):
        entries, offset = {}, 0
        for p in pieces:
            nbytes = (p.stop - p.start) * shapes[p.table][1] * itemsize
            entries[p.table] = {"dtype": _DTYPE_CODES[dtype], "shape": [p.stop - p.start, shapes[p.table][1]],
                                "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            tables[p.table]["pieces"].append({"file": fname, "rows": [p.start, p.stop]})
        meta = {"format": "pt", FORMAT: str(VERSION), **{f"rows.{p.table}": f"{p.start}:{p.stop}" for p in pieces}}
        files[fname] = _write_shard(directory / fname, _header_bytes(entries, meta), pieces, shapes, dtype, rows)
    index = {"format": FORMAT, "version": VERSION, "dtype": str(dtype).removeprefix("torch."),
             **(extra or {}), "tables": tables, "files": files}
    tmp = directory / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, directory / INDEX_NAME)
    for stale in directory.iterdir():
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in files:
            stale.unlink()
    return index


def _write_shard(path: Path, header: bytes, pieces: list[Piece], shapes, dtype, rows: RowSource) -> dict:
    digest = hashlib.sha256(header)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for p in pieces:
            d = shapes[p.table][1]
            step = max(1, CHUNK_BYTES // (d * torch.empty((), dtype=dtype).element_size()))
            for start in range(p.start, p.stop, step):
                stop = min(p.stop, start + step)
                chunk = rows(p.table, start, stop).detach().to(device="cpu", dtype=dtype).contiguous()
                if tuple(chunk.shape) != (stop - start, d):
                    raise ValueError(f"row source gave {tuple(chunk.shape)} for {p.table}[{start}:{stop}], expected {(stop - start, d)}.")
                buf = _raw_bytes(chunk)
                f.write(buf)
                digest.update(buf)
                del buf, chunk
        f.flush()
        os.fsync(f.fileno())
        _drop_cached(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _drop_cached(fd: int) -> None:
    """Let the kernel drop this file's (clean) pages from the page cache. A pool streamed through
    once should not evict everything else; and pages cached by a sequential pass sit in large
    folios, which a later memory map would page in whole (MBs per row read instead of KBs)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
        _drop_cached(f.fileno())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- reading and checking
def read_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and the byte offset of its data, after checking every
    entry against the file: known dtype, offsets inside the data, size = numel · itemsize, no
    overlap and no gap (safetensors forbids both), nothing past the end (a truncated file)."""
    if not path.is_file():
        raise FileNotFoundError(f"pool file missing: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PoolStorageError(f"{path}: {size} bytes, too short for a safetensors header (truncated?).")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise PoolStorageError(f"{path}: corrupted safetensors header: it declares {n} header bytes in a {size}-byte file.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PoolStorageError(f"{path}: corrupted safetensors header: not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise PoolStorageError(f"{path}: corrupted safetensors header: expected a JSON object.")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(e, dict) and e.get("dtype") in _ITEMSIZE and isinstance(e.get("shape"), list) \
            and all(isinstance(s, int) and s >= 0 for s in e["shape"]) and isinstance(e.get("data_offsets"), list) \
            and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"])
        if not ok:
            raise PoolStorageError(f"{path}: corrupted safetensors header: bad entry for tensor {name!r}: {e!r}.")
        begin, end = e["data_offsets"]
        if not 0 <= begin <= end:
            raise PoolStorageError(f"{path}: corrupted safetensors header: tensor {name!r} has offsets {begin}..{end}.")
        if end > data_len:
            raise PoolStorageError(
                f"{path}: truncated: tensor {name!r} ends at data byte {end} but the file holds {data_len} data bytes."
            )
        if end - begin != math.prod(e["shape"]) * _ITEMSIZE[e["dtype"]]:
            raise PoolStorageError(f"{path}: corrupted safetensors header: tensor {name!r} spans {end - begin} bytes, "
                                   f"not shape {e['shape']} × {e['dtype']}.")
        spans.append((begin, end, name))
    spans.sort()
    covered = 0
    for begin, end, name in spans:
        if begin != covered:
            raise PoolStorageError(f"{path}: corrupted safetensors header: tensor {name!r} starts at {begin}, expected {covered}.")
        covered = end
    if covered != data_len:
        raise PoolStorageError(f"{path}: {data_len - covered} bytes after the last tensor (corrupted header or appended data).")
    return header, 8 + n


@dataclass
class PoolFiles:
    """A checked pool on disk: its index, the local path of every shard, and their headers."""

    directory: Path
    index: dict
    paths: dict[str, Path]
    headers: dict[str, tuple[dict, int]]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.index["dtype"])


def resolve_pool(path: str | os.PathLike, **hub_kwargs) -> tuple[Path, dict[str, Path]] | None:
    """(index path, shard paths) of the pool of a checkpoint directory or Hub repo; None without an index."""
    sub = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        folder = Path(path) / sub
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            return None
        names = _index_file_names(index_path)
        return index_path, {name: folder / name for name in names}
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS}
    found = cached_file(str(path), INDEX_NAME, _raise_exceptions_for_missing_entries=False, **kwargs)
    if found is None:
        return None
    index_path = Path(found)
    return index_path, {name: Path(cached_file(str(path), name, **kwargs)) for name in _index_file_names(index_path)}


def _load_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PoolStorageError(f"{index_path}: not valid JSON ({err}).") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("tables"), dict) \
            or not isinstance(index.get("files"), dict):
        raise PoolStorageError(f"{index_path}: not a {FORMAT} index (needs format, tables, files).")
    if index.get("version") != VERSION:
        raise PoolStorageError(f"{index_path}: pool format version {index.get('version')!r}, this code reads {VERSION}.")
    if index.get("dtype") not in {str(t).removeprefix("torch.") for t in DTYPES.values()}:
        raise PoolStorageError(f"{index_path}: pool dtype {index.get('dtype')!r} is not a floating type {list(DTYPES)}.")
    return index


def _index_file_names(index_path: Path) -> list[str]:
    names = list(_load_index(index_path)["files"])
    for name in names:
        if not _SHARD_NAME.fullmatch(name):
            raise PoolStorageError(f"{index_path}: names an unexpected shard file {name!r}.")
    return names


def check_pool(index_path: Path, paths: dict[str, Path], shapes: dict[str, tuple[int, int]], verify: bool = False) -> PoolFiles:
    """Check a pool against the config's table shapes before any row is read.

    Missing shard → FileNotFoundError; wrong size, broken header, a table whose shape or dtype
    disagrees with the config or the index, or (verify=True) a sha256 mismatch → PoolStorageError.
    Every message names the file.
    """
    index = _load_index(index_path)
    dtype_code = _DTYPE_CODES[getattr(torch, index["dtype"])]
    if set(index["tables"]) != set(shapes):
        raise PoolStorageError(
            f"{index_path}: the pool holds tables {sorted(index['tables'])} but the config expects {sorted(shapes)} "
            "(pool_entry or pool_partitions differ)."
        )
    headers = {}
    for name, info in index["files"].items():
        path = paths[name]
        if not path.is_file():
            raise FileNotFoundError(f"pool file missing: {path} (listed in {index_path}).")
        size = path.stat().st_size
        if isinstance(info, dict) and "bytes" in info and size != info["bytes"]:
            raise PoolStorageError(f"{path}: {size} bytes, but {index_path.name} recorded {info['bytes']} (truncated or replaced).")
        headers[name] = read_header(path)
        if verify:
            if not isinstance(info, dict) or "sha256" not in info:
                raise PoolStorageError(f"{index_path}: no sha256 recorded for {name}; cannot verify it.")
            if sha256_file(path) != info["sha256"]:
                raise PoolStorageError(f"{path}: sha256 differs from the one recorded in {index_path.name} at save: the file is corrupted.")
    for table, (rows, d) in shapes.items():
        entry = index["tables"][table]
        if list(entry.get("shape", [])) != [rows, d]:
            files = sorted({p["file"] for p in entry.get("pieces", [])})
            raise PoolStorageError(
                f"{index_path} ({', '.join(files)}): table {table!r} has shape {entry.get('shape')} but the config expects "
                f"{[rows, d]} (partition size × hidden_size)."
            )
        expect = 0
        for piece in entry.get("pieces", []):
            start, stop = piece["rows"]
            path = paths.get(piece["file"])
            if path is None or start != expect or stop <= start:
                raise PoolStorageError(f"{index_path}: pieces of {table!r} do not tile rows 0..{rows} ({piece}).")
            t = headers[piece["file"]][0].get(table)
            if t is None:
                raise PoolStorageError(f"{path}: has no tensor {table!r}, which {index_path.name} places there.")
            if t["dtype"] != dtype_code:
                raise PoolStorageError(f"{path}: tensor {table!r} is {t['dtype']} but the pool is {dtype_code} ({index_path.name}).")
            if t["shape"] != [stop - start, d]:
                raise PoolStorageError(
                    f"{path}: tensor {table!r} has shape {t['shape']} but rows {start}:{stop} of hidden_size {d} "
                    f"need {[stop - start, d]}."
                )
            expect = stop
        if expect != rows:
            raise PoolStorageError(f"{index_path}: pieces of {table!r} cover rows 0..{expect}, not 0..{rows}.")
    return PoolFiles(index_path.parent, index, paths, headers)


# ---------------------------------------------------------------------------- mapping
def _map_file(path: Path, random_access: bool) -> torch.Tensor:
    """The whole file as a uint8 tensor, mapped copy-on-write: writes never reach the file."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(m, "madvise"):
        m.madvise(mmap.MADV_RANDOM if random_access else mmap.MADV_SEQUENTIAL)
    return torch.frombuffer(m, dtype=torch.uint8)  # keeps `m` alive as long as the tensor


def _map_contiguous(parts: list[tuple[Path, int, int]]) -> torch.Tensor:
    """Map (file, offset, nbytes) parts back to back into one address range: one uint8 tensor.

    Reserves the range with an inaccessible anonymous mapping, then maps each part over it with
    MAP_FIXED (POSIX). Offsets, and the lengths of all but the last part, must be page multiples:
    the writer aligns them to 64 KiB. Unmapped when the tensor is freed.
    """
    import weakref

    page = mmap.PAGESIZE
    for i, (path, offset, nbytes) in enumerate(parts):
        if offset % page or (i < len(parts) - 1 and nbytes % page):
            raise PoolStorageError(
                f"{path}: this piece of a split table is not page-aligned (offset {offset}, {nbytes} bytes), so the pieces "
                "cannot be mapped as one table. Re-save the pool with save_pretrained, or load with pool_mmap=False."
            )
    if os.name != "posix":
        raise PoolStorageError(f"{parts[0][0]}: memory-mapping a table split over several shards needs POSIX mmap; "
                               "load with pool_mmap=False or save with a larger pool_max_shard_size.")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = sum(n for _, _, n in parts)
    reserved = -(-total // page) * page
    failed = ctypes.c_void_p(-1).value
    base = libc.mmap(None, reserved, mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, failed):
        raise OSError(ctypes.get_errno(), f"cannot reserve {reserved} bytes of address space for {parts[0][0]}")
    at = base
    map_fixed = 0x10  # MAP_FIXED on Linux, macOS and the BSDs
    for path, offset, nbytes in parts:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = libc.mmap(at, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | map_fixed, fd, offset)
        finally:
            os.close(fd)
        if got != at:
            libc.munmap(base, reserved)
            raise OSError(ctypes.get_errno(), f"cannot map {path}")
        at += nbytes
    libc.madvise(base, reserved, mmap.MADV_RANDOM)
    buf = (ctypes.c_uint8 * total).from_address(base)
    weakref.finalize(buf, libc.munmap, base, reserved)
    return torch.frombuffer(buf, dtype=torch.uint8)


def map_tables(pool: PoolFiles, random_access: bool = True) -> dict[str, torch.Tensor]:
    """Every table as an (N, d) tensor over the mapped files; nothing is read until rows are touched."""
    dtype = pool.dtype
    whole: dict[str, torch.Tensor] = {}
    out = {}
    for table, entry in pool.index["tables"].items():
        rows, d = entry["shape"]
        parts = []
        for piece in entry["pieces"]:
            header, data_start = pool.headers[piece["file"]]
            begin, end = header[table]["data_offsets"]
            parts.append((pool.paths[piece["file"]], data_start + begin, end - begin))
        if len(parts) == 1:
            path, offset, nbytes = parts[0]
            if path.name not in whole:
                whole[path.name] = _map_file(path, random_access)
            if offset % dtype.itemsize:
                raise PoolStorageError(f"{path}: tensor {table!r} starts at byte {offset}, not a multiple of its {dtype} size.")
            flat = whole[path.name][offset:offset + nbytes]
        else:
            flat = _map_contiguous(parts)
        out[table] = flat.view(dtype).view(rows, d)
    return out


class Prefetcher:
    """Ask the kernel for the pages of every row a retrieval is about to read, all at once.

    Registered as a forward hook on each retriever of a memory-mapped pool: the indices exist
    before the rows are read, so MADV_WILLNEED starts the disk reads of all heads' rows in
    parallel instead of one page fault after another (a cold read from disk costs ~0.5 ms here).
    The pages go to the page cache only; they count as resident once the read touches them.
    Best effort: silently inactive where madvise is unavailable. Measured (eval/bench_pool_scale.py
    setup, 4 GB pool, cold page cache): decode 1.6-2× faster with coordinate windows, 1.4× with
    product keys; when every page is already cached, the one call per random product-key row
    costs up to a third of the decode speed (`pool_prefetch=False` then).
    """

    def __init__(self, tables: list[torch.Tensor]):
        self.tables = [(t.data_ptr(), t.shape[1] * t.element_size()) for t in tables]
        self.page = mmap.PAGESIZE
        try:
            self.madvise = ctypes.CDLL(None, use_errno=True).madvise
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            self.madvise = None

    def __call__(self, module, inputs, retrieval) -> None:
        self.request(retrieval.indices)

    def request(self, indices: torch.Tensor) -> None:
        """Ask for the pages of rows `indices` (any shape). Hashed n-gram reads call this up front,
        as soon as the ids are known (hashed.prepare_token_reads)."""
        if self.madvise is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        rows = indices.detach().reshape(-1).unique().cpu()
        for base, row_bytes in self.tables:
            first = (base + rows * row_bytes) // self.page  # (r,) first page of each row
            last = (base + (rows + 1) * row_bytes - 1) // self.page
            span = first[:, None] + torch.arange(-(-row_bytes // self.page) + 1)  # (r, pages a row can touch)
            pages = torch.minimum(span, last[:, None]).unique()
            breaks = (pages.diff() > 1).nonzero().squeeze(-1) + 1
            for run in pages.tensor_split(breaks):
                self.madvise(int(run[0]) * self.page, (int(run[-1]) - int(run[0]) + 1) * self.page, mmap.MADV_WILLNEED)
