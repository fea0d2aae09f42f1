"""Two CPU processes over gloo: data-parallel training and the row-sharded pool.

- `accelerate launch` (2 processes) trains the debug preset through training/train.py on the
  sparse pool path; afterwards both ranks hold identical weights, equal to one process trained
  on the same global batch.
- The sparse gradient all-reduce (gloo's native one and the all-gather used on other backends)
  gives DDP's mean of the dense gradients.
- Pool rows sharded over a 2-process DTensor mesh: retrieval, logits, loss, gradients and one
  optimizer step equal the unsharded model, and each rank stores and differentiates half the rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = ROOT / "configuration" / "recipes" / "debug-tinystories.yaml"
CPU_2PROC = ROOT / "configuration" / "accelerate" / "cpu-2proc.yaml"
STEPS = 3

# Run training/train.py, then let every rank write the parameters it holds.
TRAIN_AND_DUMP = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from dpsnr.training import trainer as t
    from dpsnr.training.distributed import unwrap_model

    train = t.DPSNRTrainer.train

    def train_and_dump(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        params = {n: p.detach().cpu().contiguous() for n, p in unwrap_model(self.model).named_parameters()}
        rank, world = self.args.process_index, self.args.world_size
        save_file(params, f"{self.args.output_dir}/rank{rank}-of-{world}.safetensors")
        return out

    t.DPSNRTrainer.train = train_and_dump
    from dpsnr.training.train import main
    main(sys.argv[1:])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors plus the pool's own file(s), read directly."""
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "model.safetensors" or f.name.startswith("pool"):
            weights.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return weights


@pytest.mark.slow
def test_data_parallel_training_equals_one_process_on_the_global_batch(tmp_path):
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    # Adam's first update is lr·g/(|g| + eps): an element whose contributions cancel to ~1e-9 takes
    # its sign from the summation order, which differs between one process and two. A larger eps
    # keeps such elements' updates proportional to g, so the comparison sees the reduction, not noise.
    # Two things in the debug preset depend on the batch a process sees, by design: threshold routing
    # takes its training threshold from the batch's quantile (per-device capacity, as in
    # Mixture-of-Depths) and the running query norm updates from rank 0's batch (DDP broadcasts
    # buffers, as for BatchNorm). Both are switched to batch-independent kinds here, so the
    # comparison checks the gradient reduction alone.
    common = ["--config", str(DEBUG_RECIPE), "--max_steps", str(STEPS), "--sample_max_new_tokens", "0",
              "--save_strategy", "no", "--disable_tqdm", "true", "--adam_epsilon", "1e-5",
              "--config_overrides", "{loop_halting: act, pool_query_norm: rms}"]
    one, two = tmp_path / "one-process", tmp_path / "two-processes"
    single = subprocess.run([sys.executable, "-m", "dpsnr", "train", *common, "--output_dir", str(one),
                             "--per_device_train_batch_size", "8"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-4000:]

    script = tmp_path / "train_and_dump.py"
    script.write_text(TRAIN_AND_DUMP)
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU the processes run on the CPU
    # (the recipe sets use_cpu) over gloo. The tokenizer is the one the single run trained.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--multi_gpu",
              "--num_processes", "2", "--main_process_port", str(_free_port()), str(script), *common,
              "--output_dir", str(two), "--per_device_train_batch_size", "4", "--tokenizer", str(one / "tokenizer")]
    proc = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rank0 = load_file(str(two / "rank0-of-2.safetensors"))
    rank1 = load_file(str(two / "rank1-of-2.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert any(".pool.partitions." in k for k in rank0)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"ranks differ on {k}"

    state = json.loads((two / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert json.loads((two / "training_args.json").read_text())["pool_optimizer"] == "sparse_row_adam"
    a, b = _saved_weights(one), _saved_weights(two)
    assert a.keys() == b.keys() and any(k.startswith("pool") for k in a), sorted(a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------- spawned workers
def _sparse(rows: list[int], seed: int, n: int = 10, d: int = 3) -> torch.Tensor:
    values = torch.randn(len(rows), d, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, d))


def _check_sparse_all_reduce(rank: int) -> dict:
    from dpsnr.training import distributed

    # per rank: table 0 read by both ranks (with repeated rows), table 1 read by rank 0 only
    reads = {0: ([1, 1, 4], [7]), 1: ([4, 9, 9, 9], None)}
    out = {}
    for native in (True, False):
        params = [torch.nn.Parameter(torch.zeros(10, 3)) for _ in range(2)]
        for i, rows in enumerate(reads[rank]):
            params[i].grad = None if rows is None else _sparse(rows, seed=10 * rank + i)
        expected = []
        for i in range(2):
            dense = [_sparse(reads[r][i], seed=10 * r + i).to_dense() for r in (0, 1) if reads[r][i] is not None]
            expected.append(sum(dense) / 2)  # DDP's mean over the two ranks
        saved = distributed._SPARSE_ALLREDUCE_BACKENDS
        distributed._SPARSE_ALLREDUCE_BACKENDS = ("gloo",) if native else ()
        try:
            distributed.all_reduce_sparse_grads(params)
        finally:
            distributed._SPARSE_ALLREDUCE_BACKENDS = saved
        out["native" if native else "all_gather"] = {
            "sparse": all(p.grad.is_sparse for p in params),
            "max_diff": max((p.grad.to_dense() - e).abs().max().item() for p, e in zip(params, expected)),
            "rows": [sorted(p.grad.coalesce().indices()[0].tolist()) for p in params],
        }
    return out


def _check_row_sharded_pool(rank: int, **overrides) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from modeling_dpsnr import DPSNRForCausalLM
    from modeling_dpsnr.reads import PoolRead
    from dpsnr.training.distributed import shard_pool_rows

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    ref = DPSNRForCausalLM.from_preset("debug", **overrides).train()
    ref.set_execution(loop_mode="static")
    torch.manual_seed(0)
    model = shard_pool_rows(DPSNRForCausalLM.from_preset("debug", **overrides).train(), mesh)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))

    x = torch.randn(12, ref.config.hidden_size, generator=torch.Generator().manual_seed(2))
    part = next(iter(ref.config.pool_partitions))
    read_ref, r_ref = ref.pool[part](x, x, PoolRead(static=True))
    read, r = model.pool[part](x, x, PoolRead(static=True))
    a, b = ref(ids, labels=ids), model(ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    pairs = list(zip(ref.named_parameters(), model.named_parameters()))
    grad_diff = max((full(p.grad) - q.grad).abs().max().item() for (_, q), (_, p) in pairs)
    v = model.pool[part].v
    result = {
        "indices_equal": bool(torch.equal(r_ref.indices, r.indices)),
        "weights_max_diff": (r_ref.weights - r.weights).abs().max().item(),
        "read_max_diff": (read_ref - read).abs().max().item(),
        "logits_max_diff": (a.logits - b.logits).abs().max().item(),
        "loss_diff": abs(a.loss.item() - b.loss.item()),
        "grad_max_diff": grad_diff,
        "local_rows": v.to_local().shape[0],
        "total_rows": v.shape[0],
        "grad_row_sharded": v.grad.placements[0] == Shard(0),
    }
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    opt_ref.step()
    opt.step()
    result["after_step_max_diff"] = max((full(p) - q).abs().max().item() for (_, q), (_, p) in pairs)
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = {
            "all_reduce": _check_sparse_all_reduce(rank),
            "sharded_neuron_product_key": _check_row_sharded_pool(rank),
            "sharded_value_coordinate": _check_row_sharded_pool(rank, pool_entry="value", pool_retrieval="coordinate"),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("two-process")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_sparse_gradient_all_reduce_gives_the_mean_of_dense_gradients(two_process_results):
    for rank, result in enumerate(two_process_results):
        for path, r in result["all_reduce"].items():
            assert r["sparse"], (rank, path)
            assert r["max_diff"] < 1e-6, (rank, path, r)
            assert r["rows"] == [[1, 4, 9], [7]], (rank, path, r)  # rows read on any rank, each once


@pytest.mark.parametrize("case", ["sharded_neuron_product_key", "sharded_value_coordinate"])
def test_row_sharded_pool_equals_the_unsharded_model(two_process_results, case):
    for rank, result in enumerate(two_process_results):
        r = result[case]
        assert r["indices_equal"], (rank, r)
        assert r["weights_max_diff"] < 1e-6 and r["read_max_diff"] < 1e-6, (rank, r)
        assert r["logits_max_diff"] < 1e-5 and r["loss_diff"] < 1e-5, (rank, r)
        assert r["grad_max_diff"] < 1e-5 and r["after_step_max_diff"] < 1e-5, (rank, r)
        assert r["local_rows"] == -(-r["total_rows"] // 2), (rank, r)  # each rank stores half the rows
        assert r["grad_row_sharded"], (rank, r)  # and gets only their rows' gradient
