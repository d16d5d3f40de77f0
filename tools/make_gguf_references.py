#!/usr/bin/env python3
"""diffusers' own conversion of original-named GGUF transformers, as references for runner's
(src: runner-core checkpoint/convert.rs), on files runner writes from the tiny fixtures:

    target/debug/runner quantize tests/fixtures/tiny-flux-dev/transformer --type f16 --keys original --out /tmp/tiny-flux-dev.gguf
    target/debug/runner quantize tests/fixtures/tiny-sd35/transformer --type f16 --keys original --out /tmp/tiny-sd35.gguf
    .venv-fixtures/bin/python tools/make_gguf_references.py /tmp/tiny-flux-dev.gguf /tmp/tiny-sd35.gguf

For each file: gguf's reader gives the tensors (F16 and F32 here: their values are the file's),
diffusers 0.42.1's `convert_flux_transformer_checkpoint_to_diffusers` /
`convert_sd3_transformer_checkpoint_to_diffusers` convert them (FLUX's copy with `inner_dim` read
from `img_in.weight` instead of the hard-coded 3072, the tiny widths being smaller), and each
converted tensor is checked against the diffusers fixture's own weights rounded to the file's
dtype (so runner's joining of q, k, v and swapping of halves is diffusers' inverse), then recorded:
  tests/fixtures/gguf/converted-<fixture>.json   {diffusers name: {shape, dtype, sha256 of its bytes}}

With a folder of the GGUF files runner writes from the tiny FLUX-dev and SD3.5 transformers,

    for f in tiny-flux-dev tiny-sd35; do for t in q8_0 q4_0 q4_1 q5_0 q5_1 bf16; do for k in original diffusers; do
      target/debug/runner quantize tests/fixtures/$f/transformer --type $t --keys $k --out /tmp/gguf/$f-$t-$k.gguf
    done; done; done
    .venv-fixtures/bin/python tools/make_gguf_references.py --transformers /tmp/gguf

diffusers' `from_single_file(..., quantization_config=GGUFQuantizationConfig(compute_dtype=float32),
config=<fixture>, subfolder="transformer")` loads each (GGUFLinear layers dequantizing per forward;
FLUX's converter copy with the tiny width) and runs it on seeded random inputs:
  tests/fixtures/refs/gguf-transformer.safetensors   <fixture>.<input> and <fixture>-<type>-<keys>.output
  tests/fixtures/refs/gguf-transformer.json          the sha256 of each GGUF file (runner's quantize is
                                                     deterministic: a test writes them again and compares)

Also, always: diffusers' `dequantize_gguf_tensor` arithmetic (fp16 scales and products, BF16 and
the IQ4 lookups in float32) on every quantized tensor of tests/fixtures/gguf/types.gguf:
  tests/fixtures/gguf/dequantized.json   {tensor: {dtype, shape, sha256 of the values' bytes}}
"""
import hashlib
import inspect
import json
import os
import sys

import gguf
import numpy as np
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import load_file

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def flux_converter(inner_dim):
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    src = src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}")
    ns = dict(vars(sfu))
    exec(src, ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

torch.set_num_threads(1)
r = gguf.GGUFReader(os.path.join(here, "tests/fixtures/gguf/types.gguf"))
deq = {}
for t in r.tensors:
    if t.tensor_type not in dequantize_functions:
        continue  # F32, F16: plain tensors
    block_size, type_size = GGML_QUANT_SIZES[t.tensor_type]
    raw = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1, type_size).copy())
    v = dequantize_functions[t.tensor_type](raw, block_size, type_size).contiguous()
    deq[t.name] = {"dtype": str(v.dtype).removeprefix("torch."), "numel": v.numel(), "sha256": hashlib.sha256(v.numpy().tobytes()).hexdigest()}
dest = os.path.join(here, "tests/fixtures/gguf/dequantized.json")
json.dump(deq, open(dest, "w"), indent=1, sort_keys=True)
print(f"{dest}: {len(deq)} tensors")

args = sys.argv[1:]
gguf_dir = None
if args[:1] == ["--transformers"]:
    gguf_dir, args = args[1], args[2:]

if gguf_dir:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
    from diffusers.loaders import single_file_model as sfm
    from safetensors.torch import save_file

    g = torch.Generator("cpu").manual_seed(26)
    rand = lambda *s: torch.randn(*s, generator=g)
    inputs = {
        "tiny-flux-dev": {
            "hidden_states": rand(2, 12, 64),
            "encoder_hidden_states": rand(2, 7, 24),
            "pooled_projections": rand(2, 8),
            "timestep": torch.tensor([0.9, 0.35]),
            "guidance": torch.tensor([3.5, 3.5]),
            "img_ids": torch.stack([torch.zeros(12), torch.arange(12).div(4, rounding_mode="floor").float(), (torch.arange(12) % 4).float()], 1),
            "txt_ids": torch.zeros(7, 3),
        },
        "tiny-sd35": {
            "hidden_states": rand(2, 16, 8, 8),
            "encoder_hidden_states": rand(2, 7, 24),
            "pooled_projections": rand(2, 14),
            "timestep": torch.tensor([900.0, 350.0]),
        },
    }
    tensors = {f"{fx}.{k}": v for fx, d in inputs.items() for k, v in d.items()}
    files = {}
    for name in sorted(os.listdir(gguf_dir)):
        fx = next(f for f in inputs if name.startswith(f + "-"))
        path = os.path.join(gguf_dir, name)
        cls = FluxTransformer2DModel if fx == "tiny-flux-dev" else SD3Transformer2DModel
        if cls is FluxTransformer2DModel:
            width = gguf.GGUFReader(path)
            w = next((t for t in width.tensors if t.name in ("img_in.weight", "x_embedder.weight")), None)
            sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = flux_converter(int(w.shape[-1]))
        m = cls.from_single_file(path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=os.path.join(here, "tests/fixtures", fx), subfolder="transformer", torch_dtype=torch.float32, local_files_only=True)
        assert any(type(x).__name__ == "GGUFLinear" for x in m.modules()) or "bf16" in name or "diffusers" in name, name
        with torch.no_grad():
            out = m(**inputs[fx], return_dict=False)[0]
        tensors[name.removesuffix(".gguf") + ".output"] = out.contiguous()
        files[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    save_file(tensors, os.path.join(here, "tests/fixtures/refs/gguf-transformer.safetensors"))
    json.dump({"files": files}, open(os.path.join(here, "tests/fixtures/refs/gguf-transformer.json"), "w"), indent=1, sort_keys=True)
    print(f"tests/fixtures/refs/gguf-transformer.safetensors: {len(files)} transformers")

for path in args:
    fixture = os.path.basename(path).removesuffix(".gguf")
    r = gguf.GGUFReader(path)
    sd = {}
    for t in r.tensors:
        a = np.array(t.data)
        assert t.tensor_type.name in ("F16", "F32"), (t.name, t.tensor_type.name)
        sd[t.name] = torch.from_numpy(a.reshape([int(d) for d in reversed(t.shape.tolist())]).copy())
    arch = r.fields["general.architecture"].contents()
    if arch == "flux":
        conv = flux_converter(sd["img_in.weight"].shape[0])(dict(sd))
    else:
        conv = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))
    folder = os.path.join(here, "tests/fixtures", fixture, "transformer")
    want = {}
    for f in sorted(os.listdir(folder)):  # one file or shards; no variants in these fixtures
        if f.endswith(".safetensors"):
            want.update(load_file(os.path.join(folder, f)))
    assert sorted(conv) == sorted(want), (set(conv) ^ set(want))
    out = {}
    for k in sorted(conv):
        v = conv[k].contiguous().numpy()
        w = want[k].astype(v.dtype)
        assert v.shape == w.shape and np.array_equal(v, w), k
        out[k] = {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": hashlib.sha256(v.astype(v.dtype.newbyteorder("<")).tobytes()).hexdigest()}
    dest = os.path.join(here, "tests/fixtures/gguf", f"converted-{fixture}.json")
    json.dump(out, open(dest, "w"), indent=1, sort_keys=True)
    print(f"{dest}: {len(out)} tensors, equal to the fixture's weights")
