//! Checks a JSON schema cannot express: names that depend on the pipeline kind, devices and
//! sizes that must parse and agree, and paths (missing paths are warnings: the files may be
//! written after the manifest).
//!
//! The checks read the merged JSON value rather than the typed manifest, each field parsed on
//! its own, so that they run, and report, even when other keys of the file are broken.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as J;

use super::{join_key, resolve_path_with, PipelineKind, Provenance, Want};
use crate::device::Device;
use crate::diag::{did_you_mean, Diagnostic};

fn key(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: Option<&J>) -> Option<T> {
    v.and_then(|v| serde_json::from_value(v.clone()).ok())
}

fn obj(v: Option<&J>) -> impl Iterator<Item = (&String, &J)> {
    v.and_then(J::as_object).into_iter().flat_map(|o| o.iter())
}

pub(super) fn check(m: &J, manifest_path: &Path, prov: &Provenance) -> Vec<Diagnostic> {
    let mut out = vec![];
    let components = m.get("components");
    let max_memory = m.pointer("/placement/max_memory").filter(|v| v.is_object());
    let err = |path: &[String], want: Want, msg: String| Diagnostic::error(msg, prov.locate(path, want)).with_key(join_key(path));
    let warn = |path: &[String], want: Want, msg: String| Diagnostic::warning(msg, prov.locate(path, want)).with_key(join_key(path));

    // Components: names the pipeline kind knows; `enabled = false` only where optional.
    let kind: Option<PipelineKind> = typed(m.pointer("/pipeline/kind"));
    for (name, comp) in obj(components) {
        let Some(kind) = kind else { break };
        let path = key(&["components", name]);
        if !kind.components().contains(&name.as_str()) {
            let mut d = err(&path, Want::Key, format!("unknown component `{name}` for a `{}` pipeline", kind.as_str())).with_label("not a component of this pipeline");
            if let Some(s) = did_you_mean(name, kind.components().iter().copied()) {
                d = d.with_note(format!("did you mean `{s}`?"));
            }
            let others: Vec<&str> = PipelineKind::ALL.iter().filter(|k| **k != kind && k.components().contains(&name.as_str())).map(|k| k.as_str()).collect();
            if !others.is_empty() {
                d = d.with_note(format!("`{name}` belongs to `{}` pipelines; is `pipeline.kind` right?", others.join("` and `")));
            }
            d = d.with_note(format!("components of `{}`: {}", kind.as_str(), kind.components().iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")));
            out.push(d);
            continue;
        }
        if comp.get("enabled") == Some(&J::Bool(false)) && !kind.optional_components().contains(&name.as_str()) {
            out.push(
                err(&[path.clone(), key(&["enabled"])].concat(), Want::Value, format!("component `{name}` cannot be disabled: a `{}` pipeline needs it", kind.as_str()))
                    .with_label("required component"),
            );
        }
    }

    // VAE tiling and slicing: keys of the `vae` component only.
    for (name, comp) in obj(components) {
        if name == "vae" {
            continue;
        }
        for k in ["tiling", "slicing"] {
            if comp.get(k).is_some() {
                out.push(
                    err(&key(&["components", name, k]), Want::Key, format!("`{k}` applies to the VAE only, not to component `{name}`"))
                        .with_label("VAE only")
                        .with_note(format!("diffusers' `enable_vae_{k}`: set `components.vae.{k}`")),
                );
            }
        }
    }

    // Devices in `max_memory`: each parses, none twice (`0` and `cuda:0` are the same GPU).
    let mut budgets: BTreeMap<Device, String> = BTreeMap::new();
    {
        for (name, _) in obj(max_memory) {
            let path = key(&["placement", "max_memory", name]);
            // A name that does not parse is reported by the schema's pattern.
            if let Ok(dev) = name.parse::<Device>() {
                if let Some(first) = budgets.insert(dev, name.clone()) {
                    out.push(err(&path, Want::Key, format!("device `{dev}` appears twice in `placement.max_memory` (as `{first}` and `{name}`)")).with_label("duplicate device"));
                }
            }
        }
    }

    // Pins: to a device that takes part.
    for (name, comp) in obj(components) {
        let Some(dev) = typed::<Device>(comp.get("device")) else { continue };
        let path = key(&["components", name, "device"]);
        if max_memory.is_some() && dev != Device::Cpu && !budgets.contains_key(&dev) {
            let listed = budgets.keys().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ");
            out.push(
                err(&path, Want::Value, format!("component `{name}` is pinned to `{dev}`, which `placement.max_memory` does not list"))
                    .with_label("device without a budget")
                    .with_note(format!("devices in `placement.max_memory`: {listed}; add `\"{dev}\" = \"<size>\"` there or pin to a listed device")),
            );
        }
    }

    // Layerwise casting: the storage dtype narrower than the compute dtype.
    let base: super::Dtype = typed(m.pointer("/pipeline/dtype")).unwrap_or_default();
    for (name, comp) in obj(components) {
        let Some(storage) = typed::<super::StorageDtype>(comp.get("storage_dtype")) else { continue };
        let compute = typed::<super::Dtype>(comp.get("dtype")).unwrap_or(base);
        if storage.size_bytes() >= compute.size_bytes() {
            out.push(
                err(
                    &key(&["components", name, "storage_dtype"]),
                    Want::Value,
                    format!("`components.{name}.storage_dtype = \"{}\"` is not narrower than its compute dtype `{}`: nothing to save", storage.as_str(), compute.as_str()),
                )
                .with_label("nothing to save")
                .with_note("layerwise casting stores weights in a narrower dtype: `fp8-e4m3` or `fp8-e5m2` (or `fp16` / `bf16` under `fp32`)"),
            );
        }
    }

    // Paths: the pipeline folder must be a folder; missing paths are only warnings.
    let resolve = |k: &[String], p: &Path| resolve_path_with(manifest_path, prov.origin(k), p);
    let src_key = key(&["pipeline", "source"]);
    // Hub names (`hf://ORG/NAME…`): checked for shape here; the cache is read when files are opened.
    let mut hub_sources = vec![(src_key.clone(), m.pointer("/pipeline/source"))];
    for (name, comp) in obj(components) {
        hub_sources.push((key(&["components", name, "source"]), comp.get("source")));
    }
    for (name, a) in obj(m.get("adapters")) {
        hub_sources.push((key(&["adapters", name, "source"]), a.get("source")));
    }
    for (k, v) in hub_sources {
        let Some(s) = v.and_then(J::as_str).filter(|s| crate::hub::is_hub(s)) else { continue };
        match crate::hub::HubName::parse(s) {
            Err(e) => out.push(
                err(&k, Want::Value, format!("`{}`: {e}", join_key(&k)))
                    .with_label("not a Hub name")
                    .with_note("Hub sources are `hf://ORG/NAME` (a pipeline), `hf://ORG/NAME@REVISION`, `hf://ORG/NAME/SUBFOLDER` or `hf://ORG/NAME/PATH/FILE.safetensors`"),
            ),
            Ok(n) if k == src_key && n.is_file() => out.push(
                err(&k, Want::Value, format!("`pipeline.source` must be a diffusers pipeline folder, but `{s}` names a file"))
                    .with_label("a file")
                    .with_note("to take one component's weights from a file, set `components.<name>.source`"),
            ),
            Ok(n) if k.first().is_some_and(|f| f == "adapters") && !n.is_file() => {
                out.push(err(&k, Want::Value, format!("an adapter's source is one `.safetensors` file, but `{s}` names a folder")).with_label("a folder"))
            }
            Ok(_) => {}
        }
    }
    let not_hub = |s: &&str| !crate::hub::is_hub(s);
    let src = m.pointer("/pipeline/source").and_then(J::as_str).filter(|s| !s.is_empty()).filter(not_hub).map(|p| resolve(&src_key, Path::new(p)));
    if let Some(src) = src {
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
    }
    for (name, comp) in obj(components) {
        if let Some(p) = comp.get("source").and_then(J::as_str).filter(|s| !s.is_empty()).filter(not_hub) {
            let k = key(&["components", name, "source"]);
            let r = resolve(&k, Path::new(p));
            if !r.exists() {
                out.push(warn(&k, Want::Value, format!("source of component `{name}`, `{}`, does not exist (yet)", r.display())).with_label("not found"));
            }
        }
    }
    let run_str = |name: &str| m.get("run").and_then(|r| r.get(name)).and_then(J::as_str).filter(|s| !s.is_empty()).map(Path::new);
    if let Some(p) = run_str("latents") {
        let k = key(&["run", "latents"]);
        let r = resolve(&k, p);
        if r.is_dir() {
            out.push(err(&k, Want::Value, format!("`run.latents` must be a .safetensors file, but `{}` is a folder", r.display())).with_label("a folder"));
        } else if !r.exists() {
            out.push(warn(&k, Want::Value, format!("latents file `{}` does not exist (yet)", r.display())).with_label("not found"));
        }
    }
    if let Some(p) = run_str("output") {
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

    // Keys of other kinds are ignored by this kind's diffusers pipeline: said, not refused.
    if let Some(kind) = kind {
        let mut foreign: Vec<&str> = PipelineKind::ALL.iter().flat_map(|k| k.own_run_keys().iter().copied()).filter(|n| !kind.own_run_keys().contains(n)).collect();
        foreign.sort_unstable();
        foreign.dedup();
        for name in foreign {
            if m.get("run").and_then(|r| r.get(name)).is_some() {
                let kinds: Vec<&str> = PipelineKind::ALL.iter().filter(|k| k.own_run_keys().contains(&name)).map(|k| k.as_str()).collect();
                let kinds = match kinds.split_last() {
                    Some((last, [])) => format!("`{last}`"),
                    Some((last, rest)) => format!("`{}` and `{last}`", rest.join("`, `")),
                    None => String::new(),
                };
                out.push(warn(&key(&["run", name]), Want::Key, format!("`run.{name}` only applies to {kinds} pipelines and is ignored here")).with_label("ignored"));
            }
        }
    }

    // `offload_target` and `group_blocks` on a component that does not offload (or not by groups).
    let placement_offload = m.get("placement").and_then(|p| p.get("offload")).and_then(J::as_str).unwrap_or("none").to_string();
    for (name, c) in obj(m.get("components")) {
        let offload = c.get("offload").and_then(J::as_str).map_or(placement_offload.clone(), str::to_string);
        if c.get("offload_target").is_some() && offload == "none" {
            out.push(
                warn(&key(&["components", name, "offload_target"]), Want::Key, format!("`{name}` does not offload (`offload = \"none\"`): `offload_target` does nothing for it"))
                    .with_label("no effect")
                    .with_note("unless the plan streams it (`placement.overflow = \"stream\"`) because it fits no GPU whole"),
            );
        }
        if c.get("group_blocks").is_some() && offload != "group" {
            out.push(
                warn(&key(&["components", name, "group_blocks"]), Want::Key, format!("`{name}` uses `offload = \"{offload}\"`, not `group`: `group_blocks` does nothing for it"))
                    .with_label("no effect"),
            );
        }
    }

    // FLUX's true CFG needs a negative prompt: without one diffusers runs one pass, unguided.
    if kind == Some(PipelineKind::Flux) {
        let run = m.get("run");
        let true_cfg = run.and_then(|r| r.get("true_cfg_scale")).and_then(J::as_f64);
        if let Some(s) = true_cfg.filter(|s| *s > 1.0) {
            if run.and_then(|r| r.get("negative_prompt")).is_none() {
                let mut d = warn(
                    &key(&["run", "true_cfg_scale"]),
                    Want::Value,
                    format!("`run.true_cfg_scale` is {s}, but there is no `run.negative_prompt`: true CFG is off (one transformer pass per step), as in diffusers"),
                )
                .with_label("no effect without a negative prompt")
                .with_note("set `run.negative_prompt` (`\"\"` counts) for two passes per step guided by `true_cfg_scale`");
                if run.and_then(|r| r.get("negative_prompt_2")).is_some() {
                    d = d.with_note("diffusers turns true CFG on for `negative_prompt` only: `negative_prompt_2` alone does not");
                }
                out.push(d);
            }
        }
    }
    out
}
