"""Measure the presets' parameter counts and print them as `modeling_dpsnr/presets.py` states them.

    dpsnr presets [--names debug tiny ...]

Each preset is built on the meta device (no memory, seconds even for 1.5b-100b) and counted by
`DPSNRForCausalLM.count_parameters`: total (every parameter once) and active per token at the
maximum number of steps. The lines printed are `MEASURED` entries, ready to paste when a preset
changes; `tests/test_presets.py` fails until they are. The last line is one JSON record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from dpsnr.scripting import parse_dataclasses
from modeling_dpsnr import DPSNRForCausalLM
from modeling_dpsnr.presets import MEASURED, PRESETS


@dataclass
class PresetArguments:
    """Count the parameters of every preset (or of `--names`) on the meta device."""

    names: list[str] = field(default_factory=lambda: list(PRESETS), metadata={"help": "Presets to count."})


def measure(name: str) -> tuple[int, int]:
    """(total, active at max steps) of preset `name`, built on the meta device."""
    with torch.device("meta"):
        model = DPSNRForCausalLM.from_preset(name)
    return model.count_parameters()


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_dataclasses((PresetArguments,), argv, description=PresetArguments.__doc__)
    unknown = sorted(set(args.names) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; available: {list(PRESETS)}")
    record = {}
    for name in args.names:
        total, active = measure(name)
        record[name] = {"total": total, "active": active, "matches_presets_py": MEASURED.get(name) == (total, active)}
        print(f'    "{name}": ({total:_}, {active:_}),  # {total / 1e6:,.1f}M total, {active / 1e6:,.2f}M active')
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
