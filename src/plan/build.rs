//! From a validated manifest and its pipeline folder (headers only) to a [`PlanInput`].

use std::collections::BTreeMap;

use super::inventory::{Inventory, InventoryError};
use super::memory::{working_bytes, Dims, RunShape};
use super::{modules, ComponentInput, PlanInput};
use crate::checkpoint::layout::{Component, PipelineFolder};
use crate::device::Device;
use crate::manifest::{LoadedManifest, Offload};
use crate::preflight::Configs;

/// diffusers' execution order (`model_cpu_offload_seq`), then the safety checker.
pub const EXECUTION_ORDER: [&str; 8] = ["text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder", "unet", "transformer", "vae", "safety_checker"];

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// `--devices`: the hardware, replacing detection.
    pub devices: Option<Inventory>,
    /// Leave working memory out (diffusers' weights-only view).
    pub weights_only: bool,
}

/// The job's shape, with diffusers' defaults (see [`Configs::run_shape`]).
pub fn run_shape(m: &LoadedManifest, configs: &Configs) -> RunShape {
    configs.run_shape(m)
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

/// What the working-memory estimate needs of component `name`'s config.
fn dims(configs: &Configs, name: &str) -> Dims {
    let clip =
        |c: &crate::models::clip::ClipTextConfig| Dims::Clip { hidden: c.hidden_size as u64, intermediate: c.intermediate_size as u64, layers: c.num_hidden_layers as u64, tokens: 77, guided: true };
    match name {
        "unet" => configs.unet.as_ref().map_or(Dims::None, |u| Dims::UNet { c0: u.block_out_channels[0] as u64, attention_first: u.down_block_types[0].starts_with("CrossAttn") }),
        "vae" => Dims::Vae { c0: configs.vae.block_out_channels[0] as u64, force_upcast: configs.vae.force_upcast },
        "text_encoder" => clip(&configs.text_encoder),
        "text_encoder_2" => configs.text_encoder_2.as_ref().map_or(Dims::None, clip),
        "safety_checker" => configs.safety_checker.as_ref().map_or(Dims::None, |s| {
            let v = &s.vision;
            Dims::Clip { hidden: v.hidden_size as u64, intermediate: v.intermediate_size as u64, layers: v.num_hidden_layers as u64, tokens: 257, guided: false }
        }),
        _ => Dims::None,
    }
}

/// The planner's input: sizes from the checkpoint headers, working memory from the configs
/// preflight read (the same the models are built from).
pub fn plan_input(m: &LoadedManifest, p: &PipelineFolder, configs: &Configs, inventory: Inventory, opts: &BuildOptions) -> PlanInput {
    let shape = run_shape(m, configs);
    let mut comps: Vec<&Component> = p.components.iter().filter(|c| c.checkpoint.is_some()).collect();
    comps.sort_by_key(|c| (EXECUTION_ORDER.iter().position(|n| *n == c.name).unwrap_or(EXECUTION_ORDER.len()), c.name.clone()));
    let mut notes = vec![];
    let components = comps
        .into_iter()
        .map(|c| {
            let ck = c.checkpoint.as_ref().expect("filtered");
            let spec = m.manifest.components.get(&c.name);
            let dtype = spec.and_then(|s| s.dtype).unwrap_or(m.manifest.pipeline.dtype);
            let e = dtype.size_bytes();
            let tensors: Vec<(String, u64)> = ck.tensors.iter().map(|(k, t)| (k.clone(), t.info.nbytes_as(e))).collect();
            let up_block_types = match (&configs.unet, c.name.as_str()) {
                (Some(u), "unet") => u.up_block_types.as_slice(),
                _ => &[],
            };
            let tree = modules::build(&c.class, up_block_types, &tensors);
            ComponentInput {
                name: c.name.clone(),
                class: c.class.clone(),
                dtype,
                bytes: ck.bytes_at(e),
                working: if opts.weights_only { 0 } else { working_bytes(&dims(configs, &c.name), dtype, &shape) },
                working_half: if opts.weights_only { 0 } else { working_bytes(&dims(configs, &c.name), crate::manifest::Dtype::Fp16, &shape) },
                tree,
                pin: spec.and_then(|s| s.device),
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
