#!/usr/bin/env python3
"""diffusers' own `device_map="balanced"` maps for SD 1.5 and SDXL over a grid of GPU budgets, the
reference of runner's `placement.overflow = "cpu"` (tests/plan.rs).

    python3 tools/make_balanced_maps.py DIFFUSERS ACCELERATE

DIFFUSERS / ACCELERATE: the diffusers 0.42.1 and accelerate 1.15.0 wheels (`pip download
diffusers==0.42.1 accelerate==1.15.0 --no-deps`) or their installed package folders. No torch is
needed: the functions that decide the map, diffusers' `_assign_components_to_devices` and
accelerate's `convert_file_size_to_int`, are pure Python and are taken from those sources
verbatim (by `ast`) and run here; what `_get_final_device_map` does around them (sizes at the
pipeline dtype largest first, GPUs sorted by budget largest first after accelerate's
`get_max_memory` ordered them by index, the `cpu` key dropped) is the few lines below.

Component sizes are accelerate's `compute_module_sizes(module, dtype)[""]` of the meta-device
models, computed from tests/data/shapes/{sd15,sdxl}.json (floats at the dtype, int64 buffers as
they are; tools/make_shapes.py checked the fp32 totals against accelerate itself).

Writes tests/data/balanced_maps.json: for each pipeline, dtype and layout (two to four GPUs of
500MB to 8GB), diffusers' `hf_device_map` as it returns it (it keeps only the last component it
sends to the CPU) and where each component actually ends up (components missing from the map
are loaded on the CPU by `from_pretrained`).
"""
import ast
import itertools
import json
import re
import sys
import typing
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "balanced_maps.json"
BUDGETS = ["500MB", "1GB", "2GB", "4GB", "8GB"]
FLOAT_BYTES = {"fp32": 4, "fp16": 2}


def source_of(package: str, member: str) -> str:
    """`member` (e.g. `diffusers/pipelines/x.py`) of a wheel, or of an installed package folder."""
    p = Path(package)
    if p.suffix == ".whl":
        return zipfile.ZipFile(p).read(member).decode()
    return (p.parent / member).read_text()


def function(src: str, name: str, namespace: dict):
    tree = ast.parse(src)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), name, "exec"), namespace)
    return namespace[name]


def sizes(pipe: str, dtype: str) -> dict:
    spec = json.loads((ROOT / "tests" / "data" / "shapes" / f"{pipe}.json").read_text())
    out = {}
    for name, c in spec["components"].items():
        total = 0
        for _, dt, shape in c["tensors"]:
            n = 1
            for d in shape:
                n *= d
            total += n * (8 if dt == "I64" else FLOAT_BYTES[dtype])
        out[name] = total
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ns = {"Dict": typing.Dict, "Union": typing.Union, "re": re}
    assign = function(source_of(sys.argv[1], "diffusers/pipelines/pipeline_loading_utils.py"), "_assign_components_to_devices", ns)
    to_int = function(source_of(sys.argv[2], "accelerate/utils/modeling.py"), "convert_file_size_to_int", ns)
    cases = []
    for pipe in ("sd15", "sdxl"):
        for dtype in ("fp16", "fp32"):
            module_sizes = sizes(pipe, dtype)
            # `_get_final_device_map`: largest first (Python's sort is stable: ties keep their order).
            module_sizes = dict(sorted(module_sizes.items(), key=lambda item: item[1], reverse=True))
            # Every ordering for two and three GPUs (a smaller cuda:0 tests diffusers' sort by
            # budget), non-increasing budgets for four.
            layouts = [*itertools.product(BUDGETS, repeat=2), *itertools.product(BUDGETS, repeat=3), *itertools.combinations_with_replacement(reversed(BUDGETS), 4)]
            for combo in layouts:
                # Budgets per GPU index, in this order.
                max_memory = {i: b for i, b in enumerate(combo)}
                as_int = {k: to_int(v) for k, v in max_memory.items()}
                # accelerate's `get_max_memory` orders GPU indices; diffusers sorts by budget.
                device_memory = dict(sorted(as_int.items(), key=lambda item: item[1], reverse=True))
                mapping = assign(module_sizes, device_memory, device_mapping_strategy="balanced")
                hf_device_map = {c: d for d, cs in mapping.items() for c in cs}
                placed = {c: (f"cuda:{hf_device_map[c]}" if isinstance(hf_device_map.get(c), int) else "cpu") for c in module_sizes}
                cases.append({
                    "pipeline": pipe,
                    "dtype": dtype,
                    "max_memory": {f"cuda:{k}": v for k, v in max_memory.items()},
                    "max_memory_bytes": {f"cuda:{k}": v for k, v in as_int.items()},
                    "sizes": module_sizes,
                    "hf_device_map": hf_device_map,
                    "placed": placed,
                    "overflows": any(d == "cpu" for d in placed.values()),
                })
    # One case per line: reviewable diffs.
    lines = ",\n".join(json.dumps(c, sort_keys=True) for c in cases)
    OUT.write_text(f'{{"diffusers": "0.42.1", "accelerate": "1.15.0", "cases": [\n{lines}\n]}}\n')
    print(f"{len(cases)} layouts, {sum(c['overflows'] for c in cases)} where diffusers sends a component to the CPU -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
