"""Pool rows sharded over an XLA SPMD mesh (four virtual CPU devices) give the unsharded results.

SPMD must be switched on before the process touches XLA, so the check runs in a fresh interpreter
with CPU_NUM_DEVICES=4 and reports JSON: the tables' sharding annotation, and the differences of
retrieval, logits, loss and gradients to the unsharded model on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    from modeling_dpsnr import DPSNRForCausalLM
    from modeling_dpsnr.reads import PoolRead
    from dpsnr.training.distributed import shard_pool_rows

    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (n,), ("pool",))
    dev = torch_xla.device()
    torch.manual_seed(0)
    ref = DPSNRForCausalLM.from_preset("debug").train()
    ref.set_execution(loop_mode="static")
    torch.manual_seed(0)
    model = DPSNRForCausalLM.from_preset("debug").to(dev).train()
    model.tie_weights()  # the move to XLA made new parameters and untied lm_head
    shard_pool_rows(model, mesh)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))

    a = ref(ids, labels=ids)
    a.loss.backward()
    b = model(ids.to(dev), labels=ids.to(dev))
    b.loss.backward()
    xm.mark_step()

    # retrieval of one partition on the same inputs
    x = torch.randn(16, ref.config.hidden_size, generator=torch.Generator().manual_seed(2))
    _, r_ref = ref.pool["knowledge"](x, x, PoolRead(static=True))
    out, r = model.pool["knowledge"](x.to(dev), x.to(dev), PoolRead(static=True))
    out_ref, _ = ref.pool["knowledge"](x, x, PoolRead(static=True))
    xm.mark_step()

    grads = {}
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        grads[name] = (p_ref.grad - p.grad.cpu()).abs().max().item()
    table = model.pool["knowledge"].v
    print(json.dumps({
        "devices": n,
        "table_sharding": torch_xla._XLAC._get_xla_sharding_spec(table),
        "retrieval_indices_equal": bool(torch.equal(r_ref.indices, r.indices.cpu())),
        "retrieval_weights_max_diff": (r_ref.weights - r.weights.cpu()).abs().max().item(),
        "read_max_diff": (out_ref - out.cpu()).abs().max().item(),
        "logits_max_diff": (a.logits - b.logits.cpu()).abs().max().item(),
        "loss_diff": abs(a.loss.item() - b.loss.item()),
        "grad_max_diff": max(grads.values()),
        "pool_grad_max_diff": max(v for k, v in grads.items() if k.endswith((".u", ".v"))),
        "fallbacks": sorted(met.executed_fallback_ops()),
    }))
""")


def test_spmd_row_sharded_pool_matches_unsharded(tmp_path, record):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    record("spmd_pool_rows", **result)
    assert result["devices"] == 4
    assert "devices=[4,1]" in result["table_sharding"], result["table_sharding"]  # rows split 4 ways
    assert result["retrieval_indices_equal"]
    assert result["retrieval_weights_max_diff"] < 1e-5 and result["read_max_diff"] < 1e-5
    assert result["logits_max_diff"] < 1e-4 and result["loss_diff"] < 1e-4
    assert result["grad_max_diff"] < 1e-4
    assert all(op == "aten::_local_scalar_dense" for op in result["fallbacks"]), result["fallbacks"]
