//! Which files of a Hub repo a manifest reads: what `runner pull` fetches. The same choices as
//! opening the folder on disk ([`crate::checkpoint::layout::PipelineFolder::open_with`], which
//! follows diffusers' `DiffusionPipeline.download` and `variant_compatible_siblings`), made on the
//! repo's file listing: `model_index.json`; for each enabled component without a source of its
//! own, its `config.json` and the weights of the chosen variant (falling back per component), or
//! every file of a tokenizer, scheduler or image-processor folder; nothing else (a root-level
//! `flux1-dev.safetensors` is never fetched).

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::index::parse_index;
use crate::checkpoint::layout::{pick_weights, Library, VariantPolicy};

/// A repo at one commit, as far as selection needs it.
pub trait RepoView {
    /// Every file path of the repo (`/`-separated).
    fn files(&self) -> &[String];
    /// The contents of a small file (`model_index.json`, a shard index).
    fn read(&mut self, path: &str) -> Result<Vec<u8>, String>;
}

/// What the manifest makes of one Hub source.
#[derive(Debug, Clone)]
pub enum Role {
    /// `pipeline.source`: a diffusers pipeline folder.
    Pipeline { variant: Option<String>, components: BTreeMap<String, ComponentSay> },
    /// `components.NAME.source` naming a folder or file.
    Component { library: Option<Library>, variant: Option<String>, policy: VariantPolicy },
    /// One file read as it is (a LoRA adapter).
    File,
}

/// A manifest's say over a component of a pipeline folder.
#[derive(Debug, Clone, Default)]
pub struct ComponentSay {
    pub enabled: Option<bool>,
    pub variant: Option<String>,
    /// Its weights come from elsewhere (`components.NAME.source`).
    pub has_source: bool,
    /// With weights from elsewhere, whether runner still reads this folder's `config.json` (a
    /// GGUF file, or weights with no `config.json` beside them).
    pub needs_config: bool,
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// The names of the files directly in `dir` (`""`: the root).
fn names_in(files: &[String], dir: &str) -> Vec<String> {
    files.iter().filter_map(|f| if dir.is_empty() { Some(f.as_str()) } else { f.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) }).filter(|r| !r.contains('/')).map(str::to_string).collect()
}

/// The files `role` reads under `path` (a folder or a file of the repo), sorted.
pub fn select(repo: &mut dyn RepoView, label: &str, path: &str, role: &Role) -> Result<Vec<String>, String> {
    let mut out = vec![];
    match role {
        Role::File => {
            need(repo, label, path)?;
            out.push(path.to_string());
        }
        Role::Component { library, variant, policy } => {
            let listed = |p: &str, repo: &dyn RepoView| repo.files().iter().any(|f| f == p);
            if crate::hub::is_file_path(path) {
                need(repo, label, path)?;
                out.push(path.to_string());
                // The model's config beside its weights (a GGUF file takes the pipeline's).
                let beside = join(path.rsplit_once('/').map_or("", |(d, _)| d), "config.json");
                if !path.ends_with(".gguf") && beside != path && listed(&beside, repo) {
                    out.push(beside);
                }
                if path.ends_with(".json") {
                    out.extend(shards(repo, label, path)?);
                }
            } else {
                let names = names_in(repo.files(), path);
                if names.is_empty() {
                    return Err(format!("{label}: the repo has no folder `{path}`"));
                }
                let config = join(path, "config.json");
                if listed(&config, repo) {
                    out.push(config);
                }
                out.extend(weights(repo, label, path, &names, *library, variant.as_deref(), *policy)?.0);
            }
        }
        Role::Pipeline { variant, components } => {
            let index_path = join(path, "model_index.json");
            need(repo, label, &index_path).map_err(|e| format!("{e}: not a diffusers pipeline"))?;
            out.push(index_path.clone());
            let bytes = repo.read(&index_path)?;
            let index: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).map_err(|e| format!("{label}: `{index_path}` is not a JSON object: {e}"))?;
            let (mut any_variant, mut any_weights) = (false, false);
            for (name, entry) in &index {
                if name.starts_with('_') {
                    continue;
                }
                let Some([lib, class]) = entry.as_array().and_then(|a| <&[serde_json::Value; 2]>::try_from(a.as_slice()).ok()) else { continue };
                let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) else { continue };
                let say = components.get(name).cloned().unwrap_or_default();
                if say.enabled == Some(false) {
                    continue;
                }
                let dir = join(path, name);
                let config = join(&dir, "config.json");
                let has_config = repo.files().contains(&config);
                if say.has_source {
                    // Weights from elsewhere; the config may still come from here (a GGUF or single file).
                    if has_config && say.needs_config {
                        out.push(config);
                    }
                    continue;
                }
                let names = names_in(repo.files(), &dir);
                if names.is_empty() && !repo.files().iter().any(|f| f.starts_with(&format!("{dir}/"))) {
                    return Err(format!("{label}: `{index_path}` names component `{name}` ({lib} {class}) but the repo has no folder `{dir}`"));
                }
                let is_model = !["Tokenizer", "Scheduler", "ImageProcessor", "FeatureExtractor", "Processor"].iter().any(|s| class.contains(s)) && has_config;
                if is_model {
                    out.push(config);
                    let policy = if say.variant.is_some() { VariantPolicy::Require } else { VariantPolicy::FallBack };
                    let v = say.variant.as_deref().or(variant.as_deref());
                    let (files, got_variant) = weights(repo, label, &dir, &names, Some(Library::from_index(lib)), v, policy)?;
                    out.extend(files);
                    any_variant |= got_variant;
                    any_weights = true;
                } else {
                    // diffusers' `f"{k}/*"` for tokenizers, schedulers and image processors.
                    out.extend(repo.files().iter().filter(|f| f.starts_with(&format!("{dir}/"))).cloned());
                }
            }
            if let Some(v) = variant {
                if !any_variant && any_weights {
                    return Err(format!("{label}: no component has `{v}` variant weights (diffusers: \"no such modeling files are available\")"));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn need(repo: &dyn RepoView, label: &str, path: &str) -> Result<(), String> {
    if repo.files().iter().any(|f| f == path) {
        Ok(())
    } else {
        Err(format!("{label}: the repo has no file `{path}`"))
    }
}

/// The weight files of the folder `dir` (with `names` in it), and whether the variant was found.
fn weights(repo: &mut dyn RepoView, label: &str, dir: &str, names: &[String], library: Option<Library>, variant: Option<&str>, policy: VariantPolicy) -> Result<(Vec<String>, bool), String> {
    let pick = pick_weights(Path::new(dir), names, library, variant, policy).map_err(|e| format!("{label}: {e}"))?;
    let file = join(dir, &pick.name);
    let mut out = vec![file.clone()];
    if pick.is_index {
        out.extend(shards(repo, label, &file)?);
    }
    Ok((out, pick.variant.is_some()))
}

/// The shards an index names (beside it), each of which must be in the repo.
fn shards(repo: &mut dyn RepoView, label: &str, index: &str) -> Result<Vec<String>, String> {
    let bytes = repo.read(index)?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{label}: `{index}` is not UTF-8"))?;
    let parsed = parse_index(Path::new(index), &text).map_err(|e| format!("{label}: {e}"))?;
    let dir = index.rsplit_once('/').map_or("", |(d, _)| d);
    let mut out = vec![];
    for shard in parsed.shard_names() {
        let p = join(dir, shard);
        need(repo, label, &p).map_err(|e| format!("{e} (named by `{index}`)"))?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<String>, BTreeMap<String, Vec<u8>>);
    impl RepoView for Mem {
        fn files(&self) -> &[String] {
            &self.0
        }
        fn read(&mut self, path: &str) -> Result<Vec<u8>, String> {
            self.1.get(path).cloned().ok_or_else(|| format!("no {path}"))
        }
    }

    fn flux_like() -> Mem {
        let files = [
            "model_index.json",
            "flux1-dev.safetensors",
            "ae.safetensors",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors.index.json",
            "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer_2/spiece.model",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.bin",
        ];
        let mut small = BTreeMap::new();
        small.insert(
            "model_index.json".to_string(),
            br#"{"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [null, null]}"#.to_vec(),
        );
        for (p, shards) in [
            ("text_encoder_2/model.safetensors.index.json", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
            ("transformer/diffusion_pytorch_model.safetensors.index.json", ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]),
        ] {
            small.insert(p.to_string(), format!(r#"{{"metadata": {{}}, "weight_map": {{"a": "{}", "b": "{}"}}}}"#, shards[0], shards[1]).into_bytes());
        }
        Mem(files.iter().map(|s| s.to_string()).collect(), small)
    }

    #[test]
    fn a_pipeline_takes_its_components_and_never_the_root_single_files() {
        let mut repo = flux_like();
        let got = select(&mut repo, "t", "", &Role::Pipeline { variant: None, components: BTreeMap::new() }).unwrap();
        assert!(!got.iter().any(|f| f == "flux1-dev.safetensors" || f == "ae.safetensors" || f.ends_with(".bin") || f.contains(".fp16.")), "{got:?}");
        assert!(got.contains(&"transformer/diffusion_pytorch_model-00002-of-00002.safetensors".to_string()));
        assert!(got.contains(&"tokenizer_2/spiece.model".to_string()) && got.contains(&"scheduler/scheduler_config.json".to_string()));
        assert_eq!(got.len(), 17, "{got:?}");
    }

    #[test]
    fn variants_fall_back_per_component_and_disabled_or_sourced_components_are_left() {
        let mut repo = flux_like();
        let mut components = BTreeMap::new();
        components.insert("text_encoder_2".to_string(), ComponentSay { enabled: None, variant: None, has_source: true, needs_config: true });
        components.insert("vae".to_string(), ComponentSay { has_source: true, ..Default::default() });
        components.insert("text_encoder".to_string(), ComponentSay { enabled: Some(false), ..Default::default() });
        let got = select(&mut repo, "t", "", &Role::Pipeline { variant: Some("fp16".into()), components }).unwrap();
        assert!(got.contains(&"transformer/diffusion_pytorch_model.fp16.safetensors".to_string()), "{got:?}");
        assert!(!got.iter().any(|f| f.starts_with("transformer/diffusion_pytorch_model-")), "{got:?}");
        assert!(!got.iter().any(|f| f.starts_with("vae/")), "a folder source brings its own config: {got:?}");
        assert!(!got.iter().any(|f| f.starts_with("text_encoder/")), "{got:?}");
        assert!(got.contains(&"text_encoder_2/config.json".to_string()) && !got.iter().any(|f| f.starts_with("text_encoder_2/model")), "{got:?}");
        // A variant no component has is an error, as in diffusers.
        let err = select(&mut repo, "t", "", &Role::Pipeline { variant: Some("bf16".into()), components: BTreeMap::new() }).unwrap_err();
        assert!(err.contains("no component has `bf16`"), "{err}");
    }

    #[test]
    fn component_folders_and_files() {
        let mut repo = flux_like();
        let got = select(&mut repo, "t", "text_encoder_2", &Role::Component { library: None, variant: None, policy: VariantPolicy::FallBack }).unwrap();
        assert_eq!(
            got,
            ["text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json"]
        );
        assert_eq!(select(&mut repo, "t", "flux1-dev.safetensors", &Role::File).unwrap(), ["flux1-dev.safetensors"]);
        assert!(select(&mut repo, "t", "nope.safetensors", &Role::File).unwrap_err().contains("no file `nope.safetensors`"));
        assert!(select(&mut repo, "t", "unet", &Role::Component { library: None, variant: None, policy: VariantPolicy::FallBack }).unwrap_err().contains("no folder `unet`"));
    }
}
