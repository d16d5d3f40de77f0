#!/usr/bin/env python3
"""GGUF files for runner's reader, written by the Python `gguf` package (0.19.0, the one diffusers
0.42 reads with), and what gguf's own reader and dequantizer make of them.

    .venv-fixtures/bin/python tools/make_gguf_fixtures.py     # (scripts/setup-fixtures-venv.sh)

Outputs (committed; deterministic):
  tests/fixtures/gguf/types.gguf   one (3, 256) tensor of every type diffusers dequantizes: F32,
                                   F16, BF16 and Q4_0 ... Q8_0 by `gguf.quants.quantize` of one
                                   N(0, 1) matrix; Q2_K ... Q6_K, IQ4_NL and IQ4_XS as random blocks
                                   whose f16 scales are set to finite values (gguf cannot quantize
                                   to them); a 1-D F32 bias, a 4-D F16 conv weight; metadata of
                                   each value type, an array longer than runner keeps
  tests/fixtures/gguf/types.json   per tensor: gguf.GGUFReader's type, torch-order shape, absolute
                                   data offset and byte count, and `gguf.quants.dequantize`'s
                                   first and last 8 values, sum, and the sha256 of all its values as
                                   little-endian float32 (float32 math, as numpy does);
                                   the metadata as the reader decodes it
"""
import hashlib
import json
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf")
os.makedirs(here, exist_ok=True)
path = os.path.join(here, "types.gguf")
rng = np.random.default_rng(25)
W = rng.standard_normal((3, 256)).astype(np.float32)

w = gguf.GGUFWriter(path, arch="flux")
w.add_quantization_version(gguf.GGML_QUANT_VERSION)
w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
w.add_string("runner.note", "types fixture")
w.add_float32("runner.f32", 0.5)
w.add_float64("runner.f64", -2.25)
w.add_bool("runner.bool", True)
w.add_int8("runner.i8", -3)
w.add_int64("runner.i64", -(1 << 40))
w.add_array("runner.short", [1, 2, 3])
w.add_array("runner.long", list(range(100)))
w.add_array("runner.names", ["a", "bc"])

for t in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]:
    data = gguf.quants.quantize(W, t)
    if t in (T.F32, T.F16):
        w.add_tensor(f"w.{t.name}", data)  # plain types: numpy dtype gives the type
    else:
        w.add_tensor(f"w.{t.name}", data, raw_dtype=t)

# (type, byte offsets of its f16 scales in a block)
scales = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}
for t, offs in scales.items():
    block, size = gguf.GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, size=(3, 256 // block, size), dtype=np.uint8)
    for o in offs:
        b[:, :, o : o + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.05, size=b.shape[:2])).tobytes(), np.uint8).reshape(*b.shape[:2], 2)
    w.add_tensor(f"w.{t.name}", b.reshape(3, -1), raw_dtype=t)

w.add_tensor("bias", rng.standard_normal(7).astype(np.float32))
w.add_tensor("conv", rng.standard_normal((2, 3, 4, 5)).astype(np.float16))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()


def plain(v):
    if isinstance(v, (bytes, bytearray)):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


r = gguf.GGUFReader(path)
out = {"alignment": int(r.alignment), "data_offset": int(r.data_offset), "metadata": {}, "tensors": []}
for f in r.fields.values():
    if f.name.startswith("GGUF."):
        continue
    out["metadata"][f.name] = plain(f.contents())
for t in r.tensors:
    v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    out["tensors"].append({
        "name": t.name,
        "type": t.tensor_type.name,
        "shape": [int(d) for d in reversed(t.shape.tolist())],
        "data_offset": int(t.data_offset),
        "n_bytes": int(t.n_bytes),
        "first": [float(x) for x in v[:8]],
        "last": [float(x) for x in v[-8:]],
        "sum": float(v.astype(np.float64).sum()),
        "sha256": hashlib.sha256(v.astype("<f4").tobytes()).hexdigest(),
    })
json.dump(out, open(os.path.join(here, "types.json"), "w"), indent=1)
print(f"{path}: {os.path.getsize(path)} bytes, {len(out['tensors'])} tensors")
