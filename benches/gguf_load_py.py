"""diffusers side of benches/gguf_load.sh: `FluxTransformer2DModel.from_single_file(FILE.gguf,
quantization_config=GGUFQuantizationConfig(compute_dtype=bfloat16), config=TRANSFORMER_DIR)`, timed
from before the call to the model (GGUFLinear layers) being ready.
  gguf_load_py.py TRANSFORMER_DIR FILE.gguf"""
import json
import sys
import time

import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

path, gguf = sys.argv[1], sys.argv[2]
start = time.perf_counter()
model = FluxTransformer2DModel.from_single_file(gguf, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), config=path,
                                                torch_dtype=torch.bfloat16, local_files_only=True)
load_s = time.perf_counter() - start
assert any(type(m).__name__ == "GGUFLinear" for m in model.modules())
print(json.dumps({"impl": "diffusers", "load_s": round(load_s, 3), "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
