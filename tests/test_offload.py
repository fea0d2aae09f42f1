"""Big-model inference: a device map that offloads the pool (to "disk", or everything through
`max_memory`) serves the entry tables memory-mapped from the pool's own files, while accelerate
offloads the rest of the controller as usual."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from modeling_dpsnr import DPSNRForCausalLM
from modeling_dpsnr.storage import offloaded_pool_tables

from conftest import tiny_model

V = 97
REPO = Path(__file__).resolve().parents[1]
LOOP_ON_DISK = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.loop": "disk", "model.norm": "cpu",
                "model.rotary_emb": "cpu", "lm_head": "cpu"}
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads this process's memory maps in /proc")
OFFLOADS = {
    # max_memory leaves no room in RAM: transformers maps everything ({"": "disk"})
    "everything_through_max_memory": dict(device_map="auto", max_memory={"cpu": 10_000}),
    "loop_on_disk": dict(device_map=LOOP_ON_DISK),
}


def _saved(tmp_path, save=None, **overrides):
    model = tiny_model(**overrides).eval()
    with torch.no_grad():
        for t in model.pool.entry_parameters():
            t.normal_(std=0.5)  # pool reads matter for the logits
    path = tmp_path / "ckpt"
    (save or type(model).save_pretrained)(model, path)
    return model, path


def _mapped_from(tensor: torch.Tensor, file: Path) -> bool:
    """Whether the tensor's bytes lie in this process's memory mapping of `file` (/proc/self/maps)."""
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.realpath(fields[5]) == os.path.realpath(file):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= begin and end <= hi:
                return True
    return False


@needs_proc
@pytest.mark.parametrize("offload", sorted(OFFLOADS))
def test_offloaded_pool_is_memory_mapped_and_gives_the_in_memory_logits(tmp_path, offload):
    model, path = _saved(tmp_path)
    ids = torch.randint(0, V, (2, 7))
    loaded = DPSNRForCausalLM.from_pretrained(path, offload_folder=tmp_path / "offload", **OFFLOADS[offload])
    assert "disk" in loaded.hf_device_map.values()
    assert loaded.model.loop.step.gate.weight.device.type == "meta"  # the controller is offloaded: accelerate's job

    def assert_tables_mapped():
        assert loaded._pool_source.mmap
        for t in loaded.pool.entry_parameters():
            assert _mapped_from(t, path / "pool.safetensors") and not t.requires_grad

    assert_tables_mapped()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert_tables_mapped()  # still the mapping after a forward (no hook swapped them out)
    assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False),
                       model.generate(ids, max_new_tokens=3, do_sample=False))
    assert not any((tmp_path / "offload").iterdir())  # nothing of the pool was copied to the offload folder


@needs_proc
def test_pool_on_cpu_beside_an_accelerator_is_memory_mapped_too(tmp_path):
    # No accelerator here: "meta" stands in for one. accelerate then runs on it and offloads the "cpu"
    # modules (weights in RAM, loaded at each forward); no numbers come out of meta, only the placement.
    _, path = _saved(tmp_path)
    loaded = DPSNRForCausalLM.from_pretrained(path, device_map={"": "meta", "model.loop.pool": "cpu"})
    assert loaded._pool_source.mmap
    assert all(t.device.type == "cpu" and _mapped_from(t, path / "pool.safetensors") for t in loaded.pool.entry_parameters())
    retriever = loaded.pool["knowledge"].retriever
    assert retriever.query.weight.device.type == "meta" and hasattr(retriever, "_hf_hook")  # accelerate's, as usual


@needs_proc
def test_offloaded_pool_is_never_allocated_while_loading(tmp_path):
    """transformers gives every tensor missing from model.safetensors memory and random values before
    accelerate offloads it; a pool larger than RAM must skip that. Peak memory of a fresh process
    grows by far less than the pool while loading it offloaded and running a forward."""
    small = tmp_path / "small"
    tiny_model(pool_entry="value").save_pretrained(small)
    big = tmp_path / "big"
    tiny_model(pool_entry="value", pool_size=500_000).save_pretrained(big)  # 500k × 32 × 4 B = 64 MB of tables
    script = textwrap.dedent(f"""
        import torch
        from modeling_dpsnr import DPSNRForCausalLM

        def peak():  # this process's resident high-water mark (ru_maxrss would include the parent's, from fork)
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

        kwargs = dict(device_map="auto", max_memory={{"cpu": 10_000}})
        ids = torch.randint(0, {V}, (1, 5))
        DPSNRForCausalLM.from_pretrained({str(small)!r}, offload_folder={str(tmp_path / "o1")!r}, **kwargs)(ids)  # imports
        before = peak()
        DPSNRForCausalLM.from_pretrained({str(big)!r}, offload_folder={str(tmp_path / "o2")!r}, **kwargs)(ids)
        print(peak() - before)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    grown = int(res.stdout.strip().splitlines()[-1])
    assert grown < 16e6, f"peak memory grew by {grown / 1e6:.0f} MB while loading a 64 MB pool offloaded"


def test_checkpoints_with_the_pool_inside_model_safetensors_are_offloaded_by_accelerate(tmp_path):
    model, path = _saved(tmp_path, save=PreTrainedModel.save_pretrained)  # transformers' own save: no pool files
    loaded = DPSNRForCausalLM.from_pretrained(path, offload_folder=tmp_path / "offload", device_map=LOOP_ON_DISK)
    assert loaded._pool_source is None and loaded.pool["knowledge"].v.device.type == "meta"  # accelerate's weights
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unsupported_offloads_are_refused_at_load_time_saying_what_to_do(tmp_path):
    _, path = _saved(tmp_path)
    split = dict(LOOP_ON_DISK, **{"model.loop": "cpu", "model.loop.pool.partitions.knowledge": "disk"})
    with pytest.raises(ValueError, match=r"offloads the pool tables .*knowledge.* but not .*reasoning.* memory-mapped .* as a whole.*model.loop.pool"):
        DPSNRForCausalLM.from_pretrained(path, offload_folder=tmp_path / "offload", device_map=split)
    for device_map in ("auto", LOOP_ON_DISK):  # pool_mmap places the controller on one device
        with pytest.raises(ValueError, match="(?i)drop pool_mmap"):
            DPSNRForCausalLM.from_pretrained(path, pool_mmap=True, device_map=device_map)


def test_which_tables_a_device_map_offloads_follows_accelerate():
    model = tiny_model()
    tables = {f"model.loop.pool.partitions.{p}.{t}" for p in ("knowledge", "reasoning", "grammar") for t in "uv"}
    assert set(offloaded_pool_tables(model, {"": "disk"})) == tables
    assert offloaded_pool_tables(model, {"": "cpu"}) == {}  # one device: nothing is dispatched
    assert offloaded_pool_tables(model, {"model.loop": "cpu", "lm_head": "disk"}) == {}  # cpu is where it runs
    beside_gpu = offloaded_pool_tables(model, {"": "cuda:0", "model.loop.pool": "cpu"})  # cpu beside an accelerator
    assert set(beside_gpu) == tables and set(beside_gpu.values()) == {"cpu"}
    assert offloaded_pool_tables(model, {"": 0, "model.loop.pool.partitions.grammar": "disk"}).keys() == {
        "model.loop.pool.partitions.grammar.u", "model.loop.pool.partitions.grammar.v"}
    # "model.loop.pool.partitions.knowledge.u" must not be taken for part of a module "model.loop.pool.part"
    assert offloaded_pool_tables(model, {"": 0, "model.loop.pool.part": "disk"}) == {}
