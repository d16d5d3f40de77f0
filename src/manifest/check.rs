//! Checks a JSON schema cannot express: names that depend on the pipeline kind, devices and
//! sizes that must parse and agree, and paths (missing paths are warnings: the files may be
//! written after the manifest).

use std::collections::BTreeMap;
use std::path::Path;

use super::{join_key, resolve_path_with, Manifest, PipelineKind, Provenance, Want};
use crate::device::Device;
use crate::diag::{did_you_mean, Diagnostic};

fn key(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

pub(super) fn check(m: &Manifest, manifest_path: &Path, prov: &Provenance) -> Vec<Diagnostic> {
    let mut out = vec![];
    let kind = m.pipeline.kind;
    let err = |path: &[String], want: Want, msg: String| Diagnostic::error(msg, prov.locate(path, want)).with_key(join_key(path));
    let warn = |path: &[String], want: Want, msg: String| Diagnostic::warning(msg, prov.locate(path, want)).with_key(join_key(path));

    // Components: names the pipeline kind knows; `enabled = false` only where optional.
    for (name, comp) in &m.components {
        let path = key(&["components", name]);
        if !kind.components().contains(&name.as_str()) {
            let mut d = err(&path, Want::Key, format!("unknown component `{name}` for a `{}` pipeline", kind.as_str()))
                .with_label("not a component of this pipeline");
            if let Some(s) = did_you_mean(name, kind.components().iter().copied()) {
                d = d.with_note(format!("did you mean `{s}`?"));
            }
            let other = match kind {
                PipelineKind::StableDiffusion => PipelineKind::StableDiffusionXl,
                PipelineKind::StableDiffusionXl => PipelineKind::StableDiffusion,
            };
            if other.components().contains(&name.as_str()) {
                d = d.with_note(format!("`{name}` belongs to `{}` pipelines; is `pipeline.kind` right?", other.as_str()));
            }
            d = d.with_note(format!("components of `{}`: {}", kind.as_str(), kind.components().iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")));
            out.push(d);
            continue;
        }
        if comp.enabled == Some(false) && !kind.optional_components().contains(&name.as_str()) {
            out.push(
                err(&[path.clone(), key(&["enabled"])].concat(), Want::Value, format!("component `{name}` cannot be disabled: a `{}` pipeline needs it", kind.as_str()))
                    .with_label("required component"),
            );
        }
    }

    // Devices in `max_memory`: each parses, none twice (`0` and `cuda:0` are the same GPU).
    let mut budgets: BTreeMap<Device, String> = BTreeMap::new();
    if let Some(mm) = &m.placement.max_memory {
        for name in mm.keys() {
            let path = key(&["placement", "max_memory", name]);
            match name.parse::<Device>() {
                Ok(dev) => {
                    if let Some(first) = budgets.insert(dev, name.clone()) {
                        out.push(
                            err(&path, Want::Key, format!("device `{dev}` appears twice in `placement.max_memory` (as `{first}` and `{name}`)"))
                                .with_label("duplicate device"),
                        );
                    }
                }
                Err(e) => out.push(err(&path, Want::Key, format!("invalid device in `placement.max_memory`: {e}")).with_label("not a device")),
            }
        }
    }

    // Pins: to a device that takes part.
    for (name, comp) in &m.components {
        let Some(dev) = comp.device else { continue };
        let path = key(&["components", name, "device"]);
        if m.placement.max_memory.is_some() && dev != Device::Cpu && !budgets.contains_key(&dev) {
            let listed = budgets.keys().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ");
            out.push(
                err(&path, Want::Value, format!("component `{name}` is pinned to `{dev}`, which `placement.max_memory` does not list"))
                    .with_label("device without a budget")
                    .with_note(format!("devices in `placement.max_memory`: {listed}; add `\"{dev}\" = \"<size>\"` there or pin to a listed device")),
            );
        }
    }

    // Paths: the pipeline folder must be a folder; missing paths are only warnings.
    let resolve = |k: &[String], p: &Path| resolve_path_with(manifest_path, prov.origin(k), p);
    let src_key = key(&["pipeline", "source"]);
    let src = resolve(&src_key, &m.pipeline.source);
    if src.is_file() {
        out.push(
            err(&src_key, Want::Value, format!("`pipeline.source` must be a diffusers pipeline folder, but `{}` is a file", src.display()))
                .with_label("a file")
                .with_note("to take one component's weights from a file, set `components.<name>.source`"),
        );
    } else if !src.exists() {
        out.push(warn(&src_key, Want::Value, format!("pipeline folder `{}` does not exist (yet)", src.display())).with_label("not found"));
    } else if !src.join("model_index.json").is_file() {
        out.push(warn(&src_key, Want::Value, format!("`{}` has no `model_index.json`: it does not look like a diffusers pipeline folder", src.display())).with_label("no model_index.json"));
    }
    for (name, comp) in &m.components {
        if let Some(p) = &comp.source {
            let k = key(&["components", name, "source"]);
            let r = resolve(&k, p);
            if !r.exists() {
                out.push(warn(&k, Want::Value, format!("source of component `{name}`, `{}`, does not exist (yet)", r.display())).with_label("not found"));
            }
        }
    }
    if let Some(p) = &m.run.latents {
        let k = key(&["run", "latents"]);
        let r = resolve(&k, p);
        if r.is_dir() {
            out.push(err(&k, Want::Value, format!("`run.latents` must be a .safetensors file, but `{}` is a folder", r.display())).with_label("a folder"));
        } else if !r.exists() {
            out.push(warn(&k, Want::Value, format!("latents file `{}` does not exist (yet)", r.display())).with_label("not found"));
        }
    }
    if let Some(p) = &m.run.output {
        let k = key(&["run", "output"]);
        let is_png = p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !is_png {
            out.push(err(&k, Want::Value, format!("`run.output` must name a `.png` file, found `{}`", p.display())).with_label("runner writes PNG images"));
        }
        let r = resolve(&k, p);
        if r.is_dir() {
            out.push(err(&k, Want::Value, format!("`run.output` `{}` is a folder", r.display())).with_label("a folder"));
        }
    }

    // SDXL-only keys on an SD pipeline are ignored by diffusers' StableDiffusionPipeline.
    if kind == PipelineKind::StableDiffusion {
        let r = &m.run;
        let sdxl_only = [
            ("prompt_2", r.prompt_2.is_some()),
            ("negative_prompt_2", r.negative_prompt_2.is_some()),
            ("original_size", r.original_size.is_some()),
            ("crops_coords_top_left", r.crops_coords_top_left.is_some()),
            ("target_size", r.target_size.is_some()),
        ];
        for (name, set) in sdxl_only {
            if set {
                out.push(warn(&key(&["run", name]), Want::Key, format!("`run.{name}` only applies to `stable-diffusion-xl` pipelines and is ignored here")).with_label("ignored"));
            }
        }
    }
    out
}
