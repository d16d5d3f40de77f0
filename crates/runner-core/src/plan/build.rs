//! From a validated manifest and its pipeline folder (headers only) to a [`PlanInput`].

use std::collections::BTreeMap;

use super::inventory::{Inventory, InventoryError};
use super::memory::{working_bytes, Dims, VaeTile};
use super::{modules, ComponentInput, PlanInput};
use crate::checkpoint::layout::{Component, PipelineFolder};
use crate::checkpoint::safetensors::TensorInfo;
use crate::device::Device;
use crate::manifest::{Dtype, LoadedManifest, Offload, PipelineKind};
use crate::preflight::{Configs, RunSpec};

/// diffusers' execution order (`model_cpu_offload_seq`), then the safety checker.
pub const EXECUTION_ORDER: [&str; 8] = ["text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder", "unet", "transformer", "vae", "safety_checker"];

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// `--devices`: the hardware, replacing detection.
    pub devices: Option<Inventory>,
    /// Leave working memory out (diffusers' weights-only view).
    pub weights_only: bool,
}

/// The device budgets for this manifest; the host always takes part (see [`Inventory`]).
pub fn inventory(m: &LoadedManifest, opts: &BuildOptions) -> Result<Inventory, InventoryError> {
    match &m.manifest.placement.max_memory {
        Some(mm) => {
            let parsed: BTreeMap<Device, u64> = mm.iter().filter_map(|(k, v)| k.parse::<Device>().ok().map(|d| (d, v.0))).collect();
            Inventory::from_max_memory(&parsed, opts.devices.as_ref())
        }
        None => Ok(opts.devices.clone().map(Inventory::with_detected_host).unwrap_or_else(Inventory::detect)),
    }
}

/// What the working-memory estimate needs of component `name` (a `class`)'s config in a `kind`
/// pipeline.
fn dims(kind: PipelineKind, configs: &Configs, name: &str, class: &str, tiling: bool, slicing: bool) -> Dims {
    let clip =
        |c: &crate::arch::clip::ClipTextConfig| Dims::Clip { hidden: c.hidden_size as u64, intermediate: c.intermediate_size as u64, layers: c.num_hidden_layers as u64, tokens: 77, guided: true };
    let t5 = |t: &crate::arch::t5::T5Config| Dims::T5 { d_model: t.d_model as u64, d_ff: t.d_ff as u64, heads: t.num_heads as u64, d_kv: t.d_kv as u64 };
    // The T5 encoder by its class: SD3's `text_encoder_3`, FLUX's `text_encoder_2`.
    if class == "T5EncoderModel" {
        return configs.t5.as_ref().map_or(Dims::None, t5);
    }
    match name {
        "unet" => configs.unet.as_ref().map_or(Dims::None, |u| Dims::UNet { c0: u.block_out_channels[0] as u64, attention_first: u.down_block_types[0].starts_with("CrossAttn") }),
        // SD3's and FLUX's pipelines decode at the VAE's own dtype: their configs' force_upcast
        // (true in the SD3 and FLUX repos) is never applied.
        "vae" => {
            Dims::Vae { c0: configs.vae.block_out_channels[0] as u64, force_upcast: configs.vae.force_upcast && !kind.flow_matching(), tile: tiling.then(|| vae_tile(configs)).flatten(), slicing }
        }
        "transformer" => match (&configs.transformer, &configs.flux_transformer) {
            (Some(t), _) => Dims::Sd3Transformer { hidden: (t.num_attention_heads * t.attention_head_dim) as u64, patch: t.patch_size as u64, joint: t.joint_attention_dim as u64 },
            (_, Some(t)) => Dims::FluxTransformer { hidden: t.inner_dim() as u64, head_dim: t.attention_head_dim as u64, joint: t.joint_attention_dim as u64 },
            _ => Dims::None,
        },
        "text_encoder" => clip(&configs.text_encoder),
        "text_encoder_2" => configs.text_encoder_2.as_ref().map_or(Dims::None, clip),
        "safety_checker" => configs.safety_checker.as_ref().map_or(Dims::None, |s| {
            let v = &s.vision;
            Dims::Clip { hidden: v.hidden_size as u64, intermediate: v.intermediate_size as u64, layers: v.num_hidden_layers as u64, tokens: 257, guided: false }
        }),
        _ => Dims::None,
    }
}

/// The VAE's tile ([`crate::arch::vae::AutoencoderKLConfig::tile`]; preflight refused tiling
/// without one).
fn vae_tile(configs: &Configs) -> Option<VaeTile> {
    let t = configs.vae.sample_size.map(|s| crate::arch::vae::Tile::new(s, configs.vae.block_out_channels.len()))?;
    Some(VaeTile { sample: t.sample as u64, latent: t.latent as u64 })
}

/// `dims` with VAE tiling on, where it is off and the config has a usable tile.
fn dims_tiled(dims: Dims, configs: &Configs) -> Option<Dims> {
    match dims {
        Dims::Vae { tile: None, c0, force_upcast, slicing } => {
            configs.vae.tile(std::path::Path::new("")).ok()?;
            Some(Dims::Vae { c0, force_upcast, tile: vae_tile(configs), slicing })
        }
        _ => None,
    }
}

/// Bytes of tensor `name` (`info`) of a `class` model loaded at `dtype`. transformers keeps a
/// model's `_keep_in_fp32_modules` in fp32 when it loads in fp16 (not bf16): T5's `wo`
/// projections, whatever the checkpoint stores.
pub fn tensor_bytes(class: &str, name: &str, info: &TensorInfo, dtype: Dtype) -> u64 {
    let keep_fp32 = dtype == Dtype::Fp16 && info.dtype.is_float() && class == "T5EncoderModel" && name.split('.').any(|s| s == "wo");
    info.nbytes_as(if keep_fp32 { 4 } else { dtype.size_bytes() })
}

/// The largest compute-dtype copy a layerwise-cast layer makes as it runs (its weight and bias).
fn cast_copy_bytes(cast: &std::collections::BTreeSet<String>, ck: &crate::checkpoint::layout::Checkpoint, dtype: Dtype) -> u64 {
    let mut by_layer: BTreeMap<&str, u64> = BTreeMap::new();
    for (k, t) in &ck.tensors {
        if crate::arch::cast::is_cast(cast, k) {
            *by_layer.entry(k.rsplit_once('.').map_or("", |(m, _)| m)).or_default() += t.info.nbytes_as(dtype.size_bytes());
        }
    }
    by_layer.values().copied().max().unwrap_or(0)
}

/// Where exec/scratch.rs starts each tensor in a scratch file.
const SCRATCH_ALIGN: u64 = 64;

/// A layerwise-cast layer's dtype in the checkpoint's terms.
fn storage_st(s: crate::manifest::StorageDtype) -> crate::checkpoint::safetensors::Dtype {
    use crate::checkpoint::safetensors::Dtype as St;
    use crate::manifest::StorageDtype as S;
    match s {
        S::Fp8E4m3 => St::F8_E4M3,
        S::Fp8E5m2 => St::F8_E5M2,
        S::Fp16 => St::F16,
        S::Bf16 => St::BF16,
    }
}

/// The dtype tensor `name` of a `class` model has once loaded at `dtype` (its own for integers).
fn stored_as(class: &str, name: &str, info: &TensorInfo, dtype: Dtype) -> crate::checkpoint::safetensors::Dtype {
    use crate::checkpoint::safetensors::Dtype as St;
    if !info.dtype.is_float() {
        return info.dtype;
    }
    match (dtype, tensor_bytes(class, name, info, dtype) == info.nbytes_as(4)) {
        (Dtype::Fp32, _) | (Dtype::Fp16, true) => St::F32,
        (Dtype::Fp16, false) => St::F16,
        (Dtype::Bf16, _) => St::BF16,
    }
}

/// The planner's input: sizes from the checkpoint headers, working memory from the configs
/// preflight read (the same the models are built from) and the run it worked out.
pub fn plan_input(m: &LoadedManifest, p: &PipelineFolder, configs: &Configs, run: &RunSpec, inventory: Inventory, opts: &BuildOptions) -> PlanInput {
    let shape = run.shape;
    let kind = m.manifest.pipeline.kind;
    // Live adapters' pairs weigh on their components' devices (at the component's dtype).
    let live = {
        let all: Vec<_> = p.components.iter().filter_map(|c| c.checkpoint.as_ref().map(|ck| (c.name.as_str(), c.class.as_str(), ck))).collect();
        crate::checkpoint::lora::fuse_plan(&crate::checkpoint::lora::manifest_adapters(m, true), &all).unwrap_or_default()
    };
    let mut comps: Vec<&Component> = p.components.iter().filter(|c| c.checkpoint.is_some()).collect();
    comps.sort_by_key(|c| (EXECUTION_ORDER.iter().position(|n| *n == c.name).unwrap_or(EXECUTION_ORDER.len()), c.name.clone()));
    let mut notes = vec![];
    let components = comps
        .into_iter()
        .map(|c| {
            let ck = c.checkpoint.as_ref().expect("filtered");
            let spec = m.manifest.components.get(&c.name);
            let dtype = spec.and_then(|s| s.dtype).unwrap_or(m.manifest.pipeline.dtype);
            let up_block_types = match (&configs.unet, c.name.as_str()) {
                (Some(u), "unet") => u.up_block_types.as_slice(),
                _ => &[],
            };
            if let Some((family, style)) = ck.gguf {
                let by_type = ck.bytes_by_dtype();
                let quantized: Vec<String> = by_type.iter().filter(|(t, _)| !matches!(t.as_str(), "F32" | "F16")).map(|(t, b)| format!("{t} {}", crate::units::ByteSize(*b))).collect();
                notes.push(format!(
                    "`{}` is a GGUF {} transformer ({} names): {} stay quantized, each Linear weight dequantized to {} as it runs (the largest copy, {}, is in its working memory)",
                    c.name,
                    family.as_str(),
                    if style == crate::checkpoint::gguf::KeyStyle::Original { "original" } else { "diffusers'" },
                    if quantized.is_empty() { "no weights".to_string() } else { quantized.join(", ") },
                    dtype.as_str(),
                    crate::units::ByteSize(ck.largest_dequantized(dtype.size_bytes()))
                ));
            }
            // Layerwise casting: cast layers weigh their storage dtype.
            let storage = spec.and_then(|s| s.storage_dtype);
            let cast = storage.map(|_| crate::arch::cast::cast_modules(&c.class, ck.tensors.iter().map(|(k, t)| (k.as_str(), t.info.shape.len())))).unwrap_or_default();
            let stored = |k: &str, t: &crate::checkpoint::layout::TensorLoc, dtype: Dtype| match storage {
                Some(s) if crate::arch::cast::is_cast(&cast, k) && t.info.dtype.is_float() => t.info.nbytes_as(s.size_bytes()),
                _ => tensor_bytes(&c.class, k, &t.info, dtype),
            };
            let tree_at = |dtype: Dtype| {
                let mut tensors: Vec<(String, u64)> = ck.tensors.iter().map(|(k, t)| (k.clone(), stored(k, t, dtype))).collect();
                for i in live.get(&c.name).into_iter().flatten() {
                    let module = i.weight.strip_suffix(".weight").unwrap_or(&i.weight);
                    tensors.push((format!("{module}.lora.{}.weight", i.adapter), i.params * dtype.size_bytes()));
                }
                modules::build(&c.class, up_block_types, &tensors)
            };
            // `group_blocks`: the component's own, else the pipeline's; groups merged by it.
            let group_blocks = spec.and_then(|s| s.group_blocks).or(m.manifest.placement.group_blocks).unwrap_or(1);
            let tree_at = |dtype: Dtype| {
                let mut t = tree_at(dtype);
                t.groups = modules::merge_groups(&t.groups, group_blocks);
                t
            };
            let tree = tree_at(dtype);
            let (tiling, slicing) = (spec.and_then(|s| s.tiling).unwrap_or(false), spec.and_then(|s| s.slicing).unwrap_or(false));
            let dims = dims(kind, configs, &c.name, &c.class, tiling, slicing);
            let working_at = |dims: &Dims, dtype| if opts.weights_only { 0 } else { working_bytes(dims, dtype, &shape) };
            // What `components.vae.tiling = true` would make of its working memory, to suggest it.
            let tiled = dims_tiled(dims, configs);
            // Floats stored at another dtype are converted at load (a scratch file on disk): cast
            // layers at their storage dtype, the rest at the compute dtype; each at its size in
            // the scratch file (exec/scratch.rs starts every tensor on a 64-byte boundary).
            let converted_bytes = ck
                .tensors
                .iter()
                // Text-to-image reads the VAE's decoder only (exec::loading::decoder_only).
                .filter(|(k, _)| !(c.class == "AutoencoderKL" && (k.starts_with("encoder.") || k.starts_with("quant_conv."))))
                .filter_map(|(k, t)| {
                    let cast_to = storage.filter(|_| t.info.dtype.is_float() && crate::arch::cast::is_cast(&cast, k));
                    let to = cast_to.map_or_else(|| stored_as(&c.class, k, &t.info, dtype), storage_st);
                    (t.info.dtype != to).then(|| stored(k, t, dtype).div_ceil(SCRATCH_ALIGN) * SCRATCH_ALIGN)
                })
                .sum();
            ComponentInput {
                name: c.name.clone(),
                class: c.class.clone(),
                dtype,
                bytes: tree.total,
                // + the compute copy of the largest cast layer, alive while it runs; for a GGUF
                // component, of the largest quantized weight (dequantized per forward).
                working: working_at(&dims, dtype) + if opts.weights_only { 0 } else { cast_copy_bytes(&cast, ck, dtype) + ck.largest_dequantized(dtype.size_bytes()) },
                working_half: working_at(&dims, Dtype::Fp16) + if opts.weights_only { 0 } else { ck.largest_dequantized(2) },
                working_tiled: tiled.map(|t| working_at(&t, dtype)).filter(|&w| w < working_at(&dims, dtype)),
                // What fp16 would weigh, for suggesting it (T5's `wo` stays fp32 there).
                tree_half: (dtype == Dtype::Fp32).then(|| tree_at(Dtype::Fp16)),
                tree,
                pin: spec.and_then(|s| s.device),
                offload_opts: super::OffloadOpts { target: spec.and_then(|s| s.offload_target).unwrap_or(m.manifest.placement.offload_target), group_blocks, converted_bytes },
                offload: match spec.and_then(|s| s.offload) {
                    Some(o) => o,
                    // The pipeline-wide mode: streaming modes fall back to `model` for models whose
                    // blocks runner does not know (an explicit per-component request is an error).
                    None => {
                        let o = m.manifest.placement.offload;
                        if matches!(o, Offload::Sequential | Offload::Group) && !crate::plan::streamable(&c.class) {
                            notes.push(format!("`{}` ({}) cannot be streamed block by block: it uses `model` offload instead of `placement.offload`", c.name, c.class));
                            Offload::Model
                        } else {
                            o
                        }
                    }
                },
            }
        })
        .collect();
    PlanInput { components, inventory, strategy: m.manifest.placement.strategy, overflow: m.manifest.placement.overflow, notes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::safetensors::Dtype as St;

    #[test]
    fn t5_wo_stays_fp32_in_fp16_only() {
        let n = 4096 * 10240;
        let info = |dtype: St| TensorInfo { name: String::new(), dtype, shape: vec![4096, 10240], data_offsets: (0, n * dtype.bits() / 8) };
        let wo = "encoder.block.3.layer.1.DenseReluDense.wo.weight";
        let wi = "encoder.block.3.layer.1.DenseReluDense.wi_0.weight";
        assert_eq!(tensor_bytes("T5EncoderModel", wo, &info(St::BF16), Dtype::Fp16), 4 * n, "fp16: `wo` at fp32, whatever the file stores");
        assert_eq!(tensor_bytes("T5EncoderModel", wi, &info(St::BF16), Dtype::Fp16), 2 * n);
        assert_eq!(tensor_bytes("T5EncoderModel", wo, &info(St::F32), Dtype::Bf16), 2 * n, "bf16 keeps nothing in fp32");
        assert_eq!(tensor_bytes("T5EncoderModel", wo, &info(St::F16), Dtype::Fp32), 4 * n);
        assert_eq!(tensor_bytes("SD3Transformer2DModel", "transformer_blocks.0.wo.weight", &info(St::F16), Dtype::Fp16), 2 * n, "T5 only");
        assert_eq!(tensor_bytes("T5EncoderModel", "encoder.block.0.layer.1.DenseReluDense.wout.weight", &info(St::F16), Dtype::Fp16), 2 * n, "a module named `wo`");
        assert_eq!(tensor_bytes("T5EncoderModel", wo, &info(St::I64), Dtype::Fp16), 8 * n, "integers keep their size");
    }
}
