#!/usr/bin/env python3
"""Checks that `runner shard` output loads in diffusers/transformers with identical tensors.

    .venv-fixtures/bin/python tools/check_shards.py OUT SRC_FILE_OR_DIR [--variant fp16] [--dtype fp16]

Loads OUT with the library's own `from_pretrained` (the class named in config.json) and compares
every tensor with the source read by `safetensors.torch.load_file`, cast like `runner shard --dtype`.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def source_tensors(src: Path):
    if src.is_dir():
        idx = sorted(src.glob("*.safetensors.index.json"))
        files = sorted(src.glob("*.safetensors")) if not idx else [src / f for f in set(json.loads(idx[0].read_text())["weight_map"].values())]
    else:
        files = [src]
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("src", type=Path)
    ap.add_argument("--variant")
    ap.add_argument("--dtype", choices=DTYPES)
    a = ap.parse_args()
    cfg = json.loads((a.out / "config.json").read_text())
    if "_class_name" in cfg:
        import diffusers
        cls = getattr(diffusers, cfg["_class_name"])
    else:
        import transformers
        cls = getattr(transformers, cfg["architectures"][0])
    kwargs = {"variant": a.variant} if a.variant else {}
    if a.dtype:
        kwargs["dtype"] = DTYPES[a.dtype]
    model = cls.from_pretrained(a.out, **kwargs)
    loaded = model.state_dict()
    src = source_tensors(a.src)
    bad = []
    for name, t in src.items():
        want = t.to(DTYPES[a.dtype]) if a.dtype and t.is_floating_point() else t
        got = loaded.get(name)
        if got is None or got.dtype != want.dtype or not torch.equal(got, want):
            bad.append(name)
    extra = sorted(set(loaded) - set(src))
    print(f"{cls.__name__}: {len(src)} tensors compared, {len(bad)} differ, {len(extra)} only in the loaded model")
    if bad:
        print("differ:", bad[:10])
        sys.exit(1)


if __name__ == "__main__":
    main()
