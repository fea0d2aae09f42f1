"""DPSNRTrainer's checkpoints: pickle-free, atomically written, with the pool beside the controller.

    run_dir/.tmp-checkpoint-N/          everything is written here first, fsynced, then renamed:
        model.safetensors, pool*.safetensors (+ index), config.json, code, tokenizer
        optimizer_state.{json,safetensors}, scheduler_state.{json,safetensors}
        rng_state[_<rank>].{json,safetensors}, trainer_state.json, training_args.json
    run_dir/checkpoint-N/               a complete checkpoint, or none at all

Pickle-free: `torch.save`/`torch.load` would pickle; this project never unpickles. A state object
(optimizer, scheduler, RNG) is walked once: tensors go to `<prefix>.safetensors` under generated
keys, and the structure (dicts with their key types, lists, tuples, numbers, strings, None) goes to
`<prefix>.json` with each tensor replaced by a reference to its key (`save_state` / `load_state`).
The training arguments are JSON instead of the stock `training_args.bin` pickle.

Atomic: a crash never leaves a half-written `checkpoint-N` that `get_last_checkpoint` would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .distributed import unwrap_model

logger = logging.get_logger(__name__)

OPTIMIZER_STATE = "optimizer_state"
SCHEDULER_STATE = "scheduler_state"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays (numpy RNG state)
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    raise TypeError(f"cannot serialise {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def save_state(obj: Any, prefix: str | os.PathLike) -> None:
    """Write `obj` to `<prefix>.json` and `<prefix>.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    prefix = Path(prefix)
    save_file(tensors, str(prefix.with_suffix(".safetensors")))
    prefix.with_suffix(".json").write_text(json.dumps(structure))


def load_state(prefix: str | os.PathLike) -> Any:
    """Read what `save_state` wrote; raises FileNotFoundError naming the missing file."""
    prefix = Path(prefix)
    js, st = prefix.with_suffix(".json"), prefix.with_suffix(".safetensors")
    for f in (js, st):
        if not f.exists():
            raise FileNotFoundError(f"checkpoint state file missing: {f}")
    return _decode(json.loads(js.read_text()), load_file(str(st)))


def state_exists(prefix: str | os.PathLike) -> bool:
    prefix = Path(prefix)
    return prefix.with_suffix(".json").exists() and prefix.with_suffix(".safetensors").exists()


# ---------------------------------------------------------------------------- the checkpoint folder
class CheckpointIO(TrainerCallback):
    """Writes and reads DPSNRTrainer's checkpoints (the layout in the module docstring).

    The trainer's checkpoint hooks delegate here (see trainer.PRIVATE_TRAINER_API). As a callback it
    also restores the pool beside the controller weights that `load_best_model_at_end` reloaded:
    the stock Trainer reloads model.safetensors only, and the pool lives in its own files.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` into a hidden temporary folder, then rename it into place."""
        t = self.trainer
        if t.hp_search_backend is None and trial is None:
            t.store_flos()
        run_dir = t._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{t.state.global_step}"
        final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".tmp-{name}")
        if t.args.should_save and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        t.accelerator.wait_for_everyone()
        t.save_model(tmp, _internal_call=True)
        if not t.args.save_only_model:
            self.save_optimizer_and_scheduler(tmp)
            self.save_rng_state(tmp)
        if t.args.should_save:
            t.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        t.accelerator.wait_for_everyone()
        if t.args.should_save:
            _fsync_tree(tmp)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=t.args.save_total_limit,
                best_model_checkpoint=t.state.best_model_checkpoint, use_mtime=False,
            )
        t.accelerator.wait_for_everyone()

    def save_model_files(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The model folder (weights, pool, config, code), the tokenizer and the arguments as JSON."""
        t = self.trainer
        output_dir = output_dir if output_dir is not None else t.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        t.model.save_pretrained(output_dir, state_dict=state_dict)
        if t.processing_class is not None:
            t.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(t.args.to_json_string())

    def save_optimizer_and_scheduler(self, output_dir: str) -> None:
        t = self.trainer
        if t.args.should_save:
            save_state(t.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_STATE))
            save_state(t.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_STATE))

    def load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        t = self.trainer
        prefix = os.path.join(checkpoint, OPTIMIZER_STATE)
        if not state_exists(prefix):
            logger.warning(f"No optimizer state in {checkpoint}; the optimizer starts fresh.")
            return
        t.optimizer.load_state_dict(load_state(prefix))
        t.lr_scheduler.load_state_dict(load_state(os.path.join(checkpoint, SCHEDULER_STATE)))

    def _rng_prefix(self, folder: str) -> str:
        args = self.trainer.args
        suffix = "" if args.world_size <= 1 else f"_{args.process_index}"
        return os.path.join(folder, f"rng_state{suffix}")

    def save_rng_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.random.get_rng_state_all()
        save_state(state, self._rng_prefix(output_dir))

    def load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not state_exists(self._rng_prefix(checkpoint)):
            return
        state = load_state(self._rng_prefix(checkpoint))
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state(tuple(state["numpy"]))
        torch.random.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.random.set_rng_state_all(state["cuda"])

    @staticmethod
    def load_pool(model, checkpoint: str) -> None:
        """The pool's own files in `checkpoint` into `model` (or the model a wrapper holds)."""
        core = unwrap_model(model)
        if hasattr(core, "load_pool"):
            core.load_pool(checkpoint)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self.load_pool(model, state.best_model_checkpoint)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
