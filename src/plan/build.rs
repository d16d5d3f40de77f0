//! From a validated manifest and its pipeline folder (headers only) to a [`PlanInput`].

use std::collections::BTreeMap;

use super::inventory::{Inventory, InventoryError};
use super::memory::{working_bytes, RunShape};
use super::{modules, ComponentInput, PlanInput};
use crate::checkpoint::layout::{Component, PipelineFolder, WeightFiles};
use crate::device::Device;
use crate::manifest::{LoadedManifest, Offload, PipelineKind};

/// diffusers' execution order (`model_cpu_offload_seq`), then the safety checker.
pub const EXECUTION_ORDER: [&str; 6] = ["text_encoder", "text_encoder_2", "image_encoder", "unet", "vae", "safety_checker"];

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// `--devices`: the hardware, replacing detection.
    pub devices: Option<Inventory>,
    /// Leave working memory out (diffusers' weights-only view).
    pub weights_only: bool,
}

/// The component's config.json: beside its weights, else in its pipeline subfolder.
pub fn component_config(c: &Component) -> serde_json::Value {
    let beside = c.checkpoint.as_ref().and_then(|ck| match &ck.weights.files {
        WeightFiles::Single(p) => p.parent().map(|d| d.join("config.json")),
        WeightFiles::Sharded(i) => i.path.parent().map(|d| d.join("config.json")),
    });
    [beside, Some(c.dir.join("config.json"))]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The job's shape, with diffusers' defaults: size = UNet `sample_size` x 8, guidance 7.5 (SD)
/// or 5.0 (SDXL), batch 1.
pub fn run_shape(m: &LoadedManifest, p: &PipelineFolder) -> RunShape {
    let r = &m.manifest.run;
    let sample = p.component("unet").map(component_config).and_then(|c| c.get("sample_size").and_then(|v| v.as_u64())).unwrap_or(64);
    let default_guidance = match m.manifest.pipeline.kind {
        PipelineKind::StableDiffusion => 7.5,
        PipelineKind::StableDiffusionXl => 5.0,
    };
    RunShape {
        width: r.width.map(u64::from).unwrap_or(sample * 8),
        height: r.height.map(u64::from).unwrap_or(sample * 8),
        batch: r.batch.map(u64::from).unwrap_or(1),
        guidance: r.guidance_scale.unwrap_or(default_guidance) > 1.0,
    }
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

pub fn plan_input(m: &LoadedManifest, p: &PipelineFolder, inventory: Inventory, opts: &BuildOptions) -> PlanInput {
    let shape = run_shape(m, p);
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
            let config = component_config(c);
            let tree = modules::build(&c.class, &config, &tensors);
            ComponentInput {
                name: c.name.clone(),
                class: c.class.clone(),
                dtype,
                bytes: ck.bytes_at(e),
                working: if opts.weights_only { 0 } else { working_bytes(&c.class, &config, dtype, &shape) },
                working_half: if opts.weights_only { 0 } else { working_bytes(&c.class, &config, crate::manifest::Dtype::Fp16, &shape) },
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
