//! LoRA adapter files, from the safetensors header alone: the format detected from the keys and
//! each low-rank pair mapped to the component and module it changes, as diffusers' `lora_state_dict`
//! detects and converts them (loaders/lora_pipeline.py, lora_conversion_utils.py).
//!
//! Read: diffusers/PEFT (`<component>.<module>.lora_A.weight` / `lora_B`, optional `.alpha`), the
//! older diffusers names (`…to_q_lora.down.weight`, `…lora_linear_layer.up.weight`, `.processor.`)
//! kohya's SD 1.x/2.x and SDXL names (`lora_unet_<module_with_underscores>.lora_down.weight`,
//! `lora_up`, `.alpha`; `lora_te_`, `lora_te1_`, `lora_te2_` for the text encoders; SDXL's original
//! `input_blocks` names), whose underscores are resolved against the component's own module names;
//! kohya's FLUX names (sd-scripts' `lora_unet_double_blocks_…` and ComfyUI's `diffusion_model.…`:
//! alpha baked into A and B, fused `qkv`/`linear1` split by B's rows, as
//! `_convert_kohya_flux_lora_to_diffusers`) and XLabs' FLUX names (`double_blocks.N.processor.
//! qkv_lora1…`, `_convert_xlabs_flux_lora_to_diffusers`). Refused with a message naming the format:
//! DoRA, LoKr, LoHa, LoRA biases, kohya's `lora_transformer_` mixture layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::layout::Checkpoint;
use super::safetensors::{read_header, Header, TensorInfo};
use super::CheckpointError;

/// The key layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// diffusers/PEFT: `lora_A`/`lora_B` (and the older `lora.down`/`lora.up` names).
    Peft,
    /// kohya sd-scripts / A1111 / Civitai: `lora_unet_…`, `lora_te_…`, `.alpha`.
    Kohya,
    /// kohya sd-scripts FLUX (`lora_unet_double_blocks_…`, or ComfyUI's `diffusion_model.…`).
    KohyaFlux,
    /// XLabs FLUX (`double_blocks.N.processor.qkv_lora1.down.weight`).
    Xlabs,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Peft => "diffusers/PEFT",
            Format::Kohya => "kohya",
            Format::KohyaFlux => "kohya FLUX",
            Format::Xlabs => "XLabs FLUX",
        }
    }
}

/// Which model a pair belongs to, as the file names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Owner {
    /// The denoiser (`unet.`, `transformer.`, kohya's `lora_unet_`, or no prefix).
    Denoiser,
    /// A pipeline component by name (`text_encoder`, `text_encoder_2`, …).
    Component(String),
}

/// How kohya's FLUX converter bakes `alpha / rank` into A and B (diffusers' `scale_down`/`scale_up`):
/// from the alpha as a Python float (`_convert_to_ai_toolkit`: `.item()`), or as a tensor of the
/// alpha's dtype (`_convert_to_ai_toolkit_cat`, the fused projections), which rounds the ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Bake {
    Item,
    Tensor,
}

/// One low-rank pair: `down` (A, rank × in) and `up` (B, out × rank).
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub owner: Owner,
    /// The module: a diffusers module path, or kohya's flattened name when `flat`.
    pub module: String,
    /// `module` is kohya's flattened name, resolved against the component's own module names.
    pub flat: bool,
    /// A fused projection (kohya FLUX `qkv`, `linear1`; XLabs `qkv_lora`): the modules B's rows are
    /// split among in order, each taking as many rows as its weight has; A is shared.
    pub split: Vec<String>,
    pub down: String,
    pub up: String,
    /// The `.alpha` tensor's name, when the file has one.
    pub alpha: Option<String>,
    pub rank: u64,
    /// kohya FLUX: alpha / rank multiplied into A and B when they are read (not a scaling).
    pub bake: Option<Bake>,
    /// B's two row halves swapped (kohya FLUX `final_layer_adaLN_modulation_1`, diffusers'
    /// `swap_scale_shift`).
    pub swap_up_halves: bool,
}

/// A LoRA file's header, format and pairs.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub header: Header,
    pub format: Format,
    pub pairs: Vec<Pair>,
    /// Pairs left out as diffusers leaves them out, with why (kohya FLUX's T5 `lora_te2_` pairs).
    pub dropped: Vec<(String, String)>,
}

fn bad(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::format(path, msg)
}

/// The roots of kohya's FLUX module names (after `lora_unet_`), as sd-scripts writes them.
const KOHYA_FLUX_ROOTS: [&str; 8] = ["double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_", "final_layer_"];

/// Reads and classifies a LoRA file: every key must belong to a pair (or be its `.alpha`); an
/// unsupported variant is an error naming it.
pub fn open(path: &Path) -> Result<LoraFile, CheckpointError> {
    if path.extension().is_none_or(|e| e != "safetensors") {
        return Err(bad(path, "a LoRA adapter must be a `.safetensors` file"));
    }
    let header = read_header(path)?;
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    let any = |s: &str| names.iter().any(|n| n.contains(s));
    for (needle, what) in [("dora_scale", "DoRA (`dora_scale`)"), ("lora_magnitude_vector", "DoRA (`lora_magnitude_vector`)"), ("lokr_", "LoKr (`lokr_w1`…)"), ("hada_", "LoHa (`hada_w1_a`…)")] {
        if any(needle) {
            return Err(bad(path, format!("{what} adapters are not supported: runner reads LoRA (diffusers/PEFT, kohya and XLabs) files")));
        }
    }
    if names.iter().any(|n| n.starts_with("lora_transformer_")) {
        return Err(bad(path, "a kohya LoRA in the `lora_transformer_…` (mixture) layout: not converted (diffusers/PEFT, kohya sd-scripts and XLabs FLUX LoRAs are read)"));
    }
    let kohya = !names.is_empty() && names.iter().all(|n| ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"].iter().any(|p| n.starts_with(p)));
    // diffusers' FLUX loader takes any `.lora_down.weight` file as kohya's; ComfyUI writes the same
    // layout under `diffusion_model.` (its `_convert_kohya_flux_lora_to_diffusers` renames it).
    let comfy = any(".lora_down.weight") && names.iter().any(|n| n.starts_with("diffusion_model."));
    let kohya_flux = comfy || (kohya && names.iter().any(|n| n.strip_prefix("lora_unet_").is_some_and(|m| KOHYA_FLUX_ROOTS.iter().any(|r| m.starts_with(r)))));
    let xlabs = !kohya_flux
        && names.iter().any(|n| {
            let n = n.strip_prefix("diffusion_model.").unwrap_or(n);
            (n.starts_with("double_blocks.") || n.starts_with("single_blocks.")) && n.contains(".processor.")
        });
    let sgm = |n: &&str| ["input_blocks", "middle_block", "output_blocks"].iter().any(|p| n.contains(p));
    let diffusers_blocks = |n: &&str| ["down_blocks", "mid_block", "up_blocks"].iter().any(|p| n.contains(p));
    if kohya && names.iter().any(sgm) && names.iter().any(diffusers_blocks) {
        return Err(bad(
            path,
            "a kohya LoRA with both SDXL's original block names (`input_blocks`...) and diffusers' (`down_blocks`...): diffusers drops the former; runner refuses the file rather than guess",
        ));
    }
    if any("lora_B.bias") {
        return Err(bad(path, "LoRA biases (`lora_B.bias`) are not supported"));
    }
    let mut dropped = vec![];
    let (format, pairs) = if kohya_flux {
        (Format::KohyaFlux, kohya_flux_pairs(path, &header, &mut dropped)?)
    } else if xlabs {
        (Format::Xlabs, xlabs_pairs(path, &header)?)
    } else if kohya {
        (Format::Kohya, kohya_pairs(path, &header)?)
    } else {
        (Format::Peft, peft_pairs(path, &header)?)
    };
    if pairs.is_empty() {
        return Err(bad(path, "not a LoRA file: no `lora_A`/`lora_B` or `lora_down`/`lora_up` pairs"));
    }
    Ok(LoraFile { path: path.to_path_buf(), header, format, pairs, dropped })
}

/// A PEFT key's module and side: (`unet.x.to_q`, true) for `unet.x.to_q.lora_A.weight`, with the
/// older diffusers spellings normalised.
fn peft_side(name: &str) -> Option<(String, bool)> {
    let n = name.replace(".processor.", ".");
    for (suffix, down) in [
        (".lora_A.weight", true),
        (".lora_B.weight", false),
        ("_lora.down.weight", true),
        ("_lora.up.weight", false),
        (".lora.down.weight", true),
        (".lora.up.weight", false),
        (".lora_linear_layer.down.weight", true),
        (".lora_linear_layer.up.weight", false),
    ] {
        if let Some(m) = n.strip_suffix(suffix) {
            return Some((m.to_string(), down));
        }
    }
    None
}

fn owner_of_peft(module: &str) -> (Owner, String) {
    match module.split_once('.') {
        Some(("unet" | "transformer", rest)) => (Owner::Denoiser, rest.to_string()),
        Some((p, rest)) if p.starts_with("text_encoder") => (Owner::Component(p.to_string()), rest.to_string()),
        _ => (Owner::Denoiser, module.to_string()),
    }
}

fn pair_up(
    path: &Path,
    h: &Header,
    halves: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)>,
    alpha_of: impl Fn(&str) -> Option<String>,
    owner: impl Fn(&str) -> (Owner, String),
) -> Result<Vec<Pair>, CheckpointError> {
    let mut out = vec![];
    for (module, (down, up)) in halves {
        let (Some(down), Some(up)) = (down, up) else {
            let have = down.or(up).map(|t| t.name.clone()).unwrap_or_default();
            return Err(CheckpointError::tensor(path, &have, format!("has no {} half: a LoRA pair needs both", if down.is_none() { "down (A)" } else { "up (B)" })));
        };
        let rank = *down.shape.first().unwrap_or(&0);
        if up.shape.get(1) != Some(&rank) || rank == 0 {
            return Err(CheckpointError::tensor(path, &up.name, format!("has shape {:?}, but `{}` has rank {rank} ({:?}): the ranks of A and B differ", up.shape, down.name, down.shape)));
        }
        let (owner, module_path) = owner(&module);
        let alpha = alpha_of(&module).filter(|a| h.get(a).is_some());
        out.push(Pair { owner, module: module_path, flat: false, split: vec![], down: down.name.clone(), up: up.name.clone(), alpha, rank, bake: None, swap_up_halves: false });
    }
    Ok(out)
}

fn peft_pairs(path: &Path, h: &Header) -> Result<Vec<Pair>, CheckpointError> {
    let mut halves: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for t in &h.tensors {
        if let Some((m, down)) = peft_side(&t.name) {
            let e = halves.entry(m).or_default();
            if down {
                e.0 = Some(t);
            } else {
                e.1 = Some(t);
            }
        } else if !t.name.ends_with(".alpha") {
            return Err(CheckpointError::tensor(path, &t.name, "is not part of a LoRA pair (`lora_A`/`lora_B`) nor an `.alpha`"));
        }
    }
    pair_up(path, h, halves, |m| Some(format!("{m}.alpha")), owner_of_peft)
}

/// kohya's `<module>.lora_down.weight` / `.lora_up.weight` halves by module, with each key's
/// name in the file; `.alpha` keys pass, anything else is an error.
/// Each module's down and up halves, as found so far.
type Halves<'h> = BTreeMap<String, (Option<&'h TensorInfo>, Option<&'h TensorInfo>)>;

fn kohya_halves<'h>(path: &Path, keys: impl Iterator<Item = (String, &'h TensorInfo)>) -> Result<Halves<'h>, CheckpointError> {
    let mut halves: Halves = BTreeMap::new();
    for (name, t) in keys {
        let side = name.strip_suffix(".lora_down.weight").map(|m| (m, true)).or_else(|| name.strip_suffix(".lora_up.weight").map(|m| (m, false)));
        match side {
            Some((m, down)) => {
                let e = halves.entry(m.to_string()).or_default();
                if down {
                    e.0 = Some(t);
                } else {
                    e.1 = Some(t);
                }
            }
            None if name.ends_with(".alpha") => {}
            None => return Err(CheckpointError::tensor(path, &t.name, "is not part of a kohya LoRA pair (`lora_down`/`lora_up`) nor an `.alpha`")),
        }
    }
    Ok(halves)
}

fn kohya_owner(m: &str) -> (Owner, String) {
    for (prefix, owner) in [
        ("lora_unet_", Owner::Denoiser),
        ("lora_te1_", Owner::Component("text_encoder".into())),
        ("lora_te2_", Owner::Component("text_encoder_2".into())),
        ("lora_te_", Owner::Component("text_encoder".into())),
    ] {
        if let Some(rest) = m.strip_prefix(prefix) {
            return (owner, rest.to_string());
        }
    }
    (Owner::Denoiser, m.to_string())
}

fn kohya_pairs(path: &Path, h: &Header) -> Result<Vec<Pair>, CheckpointError> {
    let halves = kohya_halves(path, h.tensors.iter().map(|t| (t.name.clone(), t)))?;
    let mut pairs = pair_up(path, h, halves, |m| Some(format!("{m}.alpha")), kohya_owner)?;
    for p in &mut pairs {
        p.flat = true;
    }
    Ok(pairs)
}

/// ComfyUI's names for kohya's FLUX layout as sd-scripts', as diffusers renames them
/// (`diffusion_model.` → `lora_unet_`, `text_encoders.clip_l.transformer.` → `lora_te_`, dots up to
/// `lora_down`/`lora_up`/`alpha` → underscores: `_custom_replace`).
fn comfy_to_kohya(name: &str) -> String {
    let n = name.replacen("diffusion_model.", "lora_unet_", 1).replacen("text_encoders.clip_l.transformer.", "lora_te_", 1);
    let cut = ["lora_down", "lora_up", "alpha"].iter().filter_map(|s| n.find(s)).min();
    match cut {
        Some(i) => {
            let b = if i > 0 && n.as_bytes()[i - 1] == b'.' { i - 1 } else { i };
            format!("{}{}", n[..b].replace('.', "_"), &n[b..])
        }
        None => n.replace('.', "_"),
    }
}

/// A kohya FLUX module (after `lora_unet_`) as diffusers' modules (`_convert_sd_scripts_to_ai_toolkit`):
/// the targets (several for a fused projection), how alpha is baked, whether B's halves swap.
fn kohya_flux_module(m: &str) -> Option<(Vec<String>, Option<Bake>, bool)> {
    let one = |t: &str| Some((vec![t.to_string()], Some(Bake::Item), false));
    let split = |ts: &[&str]| Some((ts.iter().map(|t| t.to_string()).collect(), Some(Bake::Tensor), false));
    let block = |rest: &str, root: &str| -> Option<(usize, String)> {
        let r = rest.strip_prefix(root)?;
        let (i, tail) = r.split_once('_')?;
        Some((i.parse().ok()?, tail.to_string()))
    };
    if let Some((i, tail)) = block(m, "double_blocks_") {
        let b = format!("transformer_blocks.{i}");
        let t = |s: &str| format!("{b}.{s}");
        return match tail.as_str() {
            "img_attn_proj" => one(&t("attn.to_out.0")),
            "img_attn_qkv" => split(&[&t("attn.to_q"), &t("attn.to_k"), &t("attn.to_v")]),
            "img_mlp_0" => one(&t("ff.net.0.proj")),
            "img_mlp_2" => one(&t("ff.net.2")),
            "img_mod_lin" => one(&t("norm1.linear")),
            "txt_attn_proj" => one(&t("attn.to_add_out")),
            "txt_attn_qkv" => split(&[&t("attn.add_q_proj"), &t("attn.add_k_proj"), &t("attn.add_v_proj")]),
            "txt_mlp_0" => one(&t("ff_context.net.0.proj")),
            "txt_mlp_2" => one(&t("ff_context.net.2")),
            "txt_mod_lin" => one(&t("norm1_context.linear")),
            _ => None,
        };
    }
    if let Some((i, tail)) = block(m, "single_blocks_") {
        let t = |s: &str| format!("single_transformer_blocks.{i}.{s}");
        return match tail.as_str() {
            "linear1" => split(&[&t("attn.to_q"), &t("attn.to_k"), &t("attn.to_v"), &t("proj_mlp")]),
            "linear2" => one(&t("proj_out")),
            "modulation_lin" => one(&t("norm.linear")),
            _ => None,
        };
    }
    match m {
        "guidance_in_in_layer" => one("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in_out_layer" => one("time_text_embed.guidance_embedder.linear_2"),
        "img_in" => one("x_embedder"),
        "txt_in" => one("context_embedder"),
        "time_in_in_layer" => one("time_text_embed.timestep_embedder.linear_1"),
        "time_in_out_layer" => one("time_text_embed.timestep_embedder.linear_2"),
        "vector_in_in_layer" => one("time_text_embed.text_embedder.linear_1"),
        "vector_in_out_layer" => one("time_text_embed.text_embedder.linear_2"),
        // diffusers leaves the final layer's pairs unscaled (their alphas are dropped) and swaps
        // the modulation's shift and scale rows.
        "final_layer_adaLN_modulation_1" => Some((vec!["norm_out.linear".into()], None, true)),
        "final_layer_linear" => Some((vec!["proj_out".into()], None, false)),
        _ => None,
    }
}

fn kohya_flux_pairs(path: &Path, h: &Header, dropped: &mut Vec<(String, String)>) -> Result<Vec<Pair>, CheckpointError> {
    let renamed: Vec<(String, &TensorInfo)> = h.tensors.iter().map(|t| (if t.name.starts_with("lora_") { t.name.clone() } else { comfy_to_kohya(&t.name) }, t)).collect();
    for (n, t) in &renamed {
        if !["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"].iter().any(|p| n.starts_with(p)) {
            return Err(CheckpointError::tensor(path, &t.name, "is not part of a kohya FLUX LoRA pair (`lora_unet_…`, `lora_te1_…`, or ComfyUI's `diffusion_model.…`)"));
        }
    }
    let alphas: BTreeMap<&str, &str> = renamed.iter().filter_map(|(n, t)| n.strip_suffix(".alpha").map(|m| (m, t.name.as_str()))).collect();
    let halves = kohya_halves(path, renamed.iter().map(|(n, t)| (n.clone(), *t)))?;
    let mut pairs = pair_up(path, h, halves, |m| alphas.get(m).map(|a| a.to_string()), kohya_owner)?;
    let mut out = vec![];
    for mut p in pairs.drain(..) {
        match &p.owner {
            Owner::Denoiser => match kohya_flux_module(&p.module) {
                Some((mut targets, bake, swap)) => {
                    p.bake = bake;
                    p.swap_up_halves = swap;
                    if targets.len() == 1 {
                        p.module = targets.remove(0);
                    } else {
                        p.split = targets;
                    }
                }
                None => p.flat = true,
            },
            Owner::Component(c) if c == "text_encoder_2" => {
                dropped.push((p.down.clone(), "a T5 (`lora_te2_`) pair: diffusers' FLUX loader drops these (and ComfyUI applies none to T5)".into()));
                continue;
            }
            Owner::Component(_) => {
                p.flat = true;
                p.bake = Some(Bake::Item);
            }
        }
        out.push(p);
    }
    Ok(out)
}

/// XLabs' FLUX names as diffusers' modules (`_convert_xlabs_flux_lora_to_diffusers`): `qkv_lora*`
/// split into q/k/v by B's rows; no alphas.
fn xlabs_pairs(path: &Path, h: &Header) -> Result<Vec<Pair>, CheckpointError> {
    let mut halves: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for t in &h.tensors {
        let n = t.name.strip_prefix("diffusion_model.").unwrap_or(&t.name);
        let side = n.strip_suffix(".down.weight").map(|m| (m, true)).or_else(|| n.strip_suffix(".up.weight").map(|m| (m, false)));
        let Some((m, down)) = side.filter(|(m, _)| m.contains(".processor.")) else {
            return Err(CheckpointError::tensor(path, &t.name, "is not part of an XLabs LoRA pair (`<block>.processor.<name>.down.weight` / `.up.weight`)"));
        };
        let e = halves.entry(m.to_string()).or_default();
        if down {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    let mut pairs = pair_up(path, h, halves, |_| None, |m| (Owner::Denoiser, m.to_string()))?;
    for p in &mut pairs {
        let parts: Vec<&str> = p.module.split('.').collect();
        let (targets, why): (Vec<String>, _) = match parts.as_slice() {
            ["double_blocks", i, "processor", name] => {
                let t = |s: &str| format!("transformer_blocks.{i}.attn.{s}");
                match *name {
                    "proj_lora1" => (vec![t("to_out.0")], None),
                    "proj_lora2" => (vec![t("to_add_out")], None),
                    "qkv_lora1" => (vec![t("to_q"), t("to_k"), t("to_v")], None),
                    "qkv_lora2" => (vec![t("add_q_proj"), t("add_k_proj"), t("add_v_proj")], None),
                    _ => (vec![], Some(name)),
                }
            }
            ["single_blocks", i, "processor", name] => match *name {
                "proj_lora" => (vec![format!("single_transformer_blocks.{i}.proj_out")], None),
                "qkv_lora" => (["to_q", "to_k", "to_v"].iter().map(|s| format!("single_transformer_blocks.{i}.attn.{s}")).collect(), None),
                _ => (vec![], Some(name)),
            },
            _ => (vec![], Some(&"")),
        };
        if let Some(name) = why {
            return Err(CheckpointError::tensor(
                path,
                &p.down,
                format!("names an XLabs processor layer runner does not know (`{name}`; known: qkv_lora1/2, proj_lora1/2, single blocks' qkv_lora/proj_lora)"),
            ));
        }
        if targets.len() == 1 {
            p.module = targets[0].clone();
        } else {
            p.split = targets;
        }
    }
    Ok(pairs)
}

/// A kohya UNet module in the original (sgm) block names as diffusers' flattened one
/// (`_maybe_map_sgm_blocks_to_diffusers`, then `_convert_unet_lora_key`'s renames):
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_k` → `down_blocks_1_attentions_0_…`, with
/// `layers_per_block` resnets per down block. Names in diffusers' blocks come back unchanged.
pub fn sgm_to_diffusers(module: &str, layers_per_block: usize) -> String {
    let per = layers_per_block + 1;
    let parts: Vec<&str> = module.split('_').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let rest = |from: usize| parts.get(from..).map(|r| r.join("_")).unwrap_or_default();
    let join = |head: String, tail: String| if tail.is_empty() { head } else { format!("{head}_{tail}") };
    let inner = |i: usize| ["resnets", "attentions", "upsamplers"].get(i).copied().unwrap_or("resnets");
    let mapped = match (parts.first().copied(), parts.get(1).copied()) {
        (Some("input"), Some("blocks")) if num(2) == Some(0) && num(3) == Some(0) => join("conv_in".into(), rest(4)),
        (Some("input"), Some("blocks")) => match (num(2), num(3)) {
            (Some(i), Some(k)) if i >= 1 => {
                let (block, layer) = ((i - 1) / per, (i - 1) % per);
                if rest(4) == "op" {
                    format!("down_blocks_{block}_downsamplers_0_conv")
                } else {
                    join(format!("down_blocks_{block}_{}_{layer}", inner(k)), rest(4))
                }
            }
            _ => module.to_string(),
        },
        (Some("middle"), Some("block")) => match num(2) {
            Some(0) => join("mid_block_resnets_0".into(), rest(3)),
            Some(1) => join("mid_block_attentions_0".into(), rest(3)),
            Some(2) => join("mid_block_resnets_1".into(), rest(3)),
            _ => module.to_string(),
        },
        (Some("output"), Some("blocks")) => match (num(2), num(3)) {
            (Some(i), Some(k)) => {
                let (block, layer) = (i / per, i % per);
                join(format!("up_blocks_{block}_{}_{}", inner(k), if k < 2 { layer } else { 0 }), rest(4))
            }
            _ => module.to_string(),
        },
        (Some("time"), Some("embed")) => match num(2) {
            Some(0) => "time_embedding_linear_1".into(),
            Some(2) => "time_embedding_linear_2".into(),
            _ => module.to_string(),
        },
        (Some("label"), Some("emb")) => match (num(2), num(3)) {
            (Some(0), Some(0)) => "add_embedding_linear_1".into(),
            (Some(0), Some(2)) => "add_embedding_linear_2".into(),
            _ => module.to_string(),
        },
        (Some("out"), Some("2")) if parts.len() == 2 => "conv_out".into(),
        _ => return module.to_string(),
    };
    // The resnet and sampler layers' original names.
    mapped
        .replace("in_layers_2", "conv1")
        .replace("out_layers_3", "conv2")
        .replace("emb_layers_1", "time_emb_proj")
        .replace("skip_connection", "conv_shortcut")
        .replace("upsamplers_0_op", "upsamplers_0_conv")
}

/// A pair matched to a weight of a pipeline component.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub component: String,
    /// The weight it changes (`<module>.weight`).
    pub weight: String,
    pub down: String,
    pub up: String,
    pub rank: u64,
    /// `.alpha`'s tensor, read at load (alpha = rank without one).
    pub alpha: Option<String>,
    /// The rows of B this weight takes (start, count), for a fused projection split.
    pub up_rows: Option<(u64, u64)>,
    pub bake: Option<Bake>,
    pub swap_up_halves: bool,
}

/// What [`resolve`] makes of a file against the pipeline's components.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    pub resolved: Vec<Resolved>,
    /// Pairs naming no module of the pipeline (key names).
    pub unmatched: Vec<String>,
    /// Pairs whose shapes do not fit their module: (down key, why).
    pub misfit: Vec<(String, String)>,
}

/// Matches the pairs of `lora` with the weights of `components` (name, class, checkpoint): the
/// denoiser is the `unet` or `transformer` present; kohya's flattened names are resolved against
/// each component's own module names (`down_blocks_0_…_to_q` is the module whose dots, turned to
/// underscores, give it). Shapes: a Linear `[out, in]` with A `[r, in]`, B `[out, r]`; a Conv2d
/// `[out, in, k, k]` with A `[r, in, k, k]`, B `[out, r, 1, 1]`. A fused projection's B is split
/// by the rows of its targets, which must add up to B's.
pub fn resolve(lora: &LoraFile, components: &[(&str, &str, &Checkpoint)], only: Option<&[String]>) -> Resolution {
    let denoiser = components.iter().find(|(n, _, _)| *n == "unet" || *n == "transformer").map(|(n, _, _)| *n);
    // Per component, once: its weights by flattened module name, and its resnets per down block.
    let mut flat: BTreeMap<&str, (BTreeMap<String, String>, usize)> = BTreeMap::new();
    let mut out = Resolution::default();
    for p in &lora.pairs {
        let comp = match &p.owner {
            Owner::Denoiser => denoiser,
            Owner::Component(c) => components.iter().find(|(n, _, _)| n == c).map(|(n, _, _)| *n),
        };
        let Some(comp) = comp.filter(|c| only.is_none_or(|o| o.iter().any(|x| x == c))) else {
            if only.is_none() {
                out.unmatched.push(p.down.clone());
            }
            continue;
        };
        let ck = components.iter().find(|(n, _, _)| *n == comp).map(|(_, _, ck)| *ck).expect("found");
        let exact = |m: &str| [format!("{m}.weight"), format!("text_model.{m}.weight")].into_iter().find(|w| ck.tensors.contains_key(w));
        let weights: Option<Vec<String>> = if !p.split.is_empty() {
            p.split.iter().map(|m| exact(m)).collect()
        } else if p.flat {
            let (names, lpb) = flat.entry(comp).or_insert_with(|| {
                let names = ck.tensors.keys().filter_map(|k| k.strip_suffix(".weight")).map(|m| (m.replace('.', "_"), format!("{m}.weight"))).collect();
                let lpb = (0..).take_while(|j| ck.tensors.keys().any(|k| k.starts_with(&format!("down_blocks.0.resnets.{j}.")))).count();
                (names, lpb)
            });
            // sd-scripts names CLIP from transformers 4's `text_model.` root; checkpoints saved
            // by transformers 5 have none (and the reverse).
            let alt = p.module.strip_prefix("text_model_").map(str::to_string).unwrap_or_else(|| format!("text_model_{}", p.module));
            // SDXL's kohya files name the UNet's blocks as the original (sgm) checkpoint does.
            let sgm = (p.owner == Owner::Denoiser).then(|| sgm_to_diffusers(&p.module, (*lpb).max(1)));
            names.get(&p.module).or_else(|| names.get(&alt)).or_else(|| sgm.as_ref().and_then(|m| names.get(m))).cloned().map(|w| vec![w])
        } else {
            exact(&p.module).map(|w| vec![w])
        };
        let Some(weights) = weights else {
            out.unmatched.push(p.down.clone());
            continue;
        };
        let (a, b) = (&lora.header.get(&p.down).expect("paired").shape, &lora.header.get(&p.up).expect("paired").shape);
        let rows: Vec<u64> = weights.iter().map(|w| ck.tensors[w].shape().first().copied().unwrap_or(0)).collect();
        if p.split.len() > 1 && rows.iter().sum::<u64>() != b.first().copied().unwrap_or(0) {
            let list: Vec<String> = weights.iter().zip(&rows).map(|(w, r)| format!("`{w}` {r}")).collect();
            out.misfit.push((p.down.clone(), format!("B is {b:?}, but the rows of {} in `{comp}` add up to {}", list.join(" + "), rows.iter().sum::<u64>())));
            continue;
        }
        let mut start = 0;
        let mut fitted = vec![];
        for (weight, n) in weights.into_iter().zip(rows) {
            let w = ck.tensors[&weight].shape().to_vec();
            let b_rows = if p.split.len() > 1 { n } else { b.first().copied().unwrap_or(0) };
            let fits = match w.len() {
                2 => a.len() == 2 && b.len() == 2 && a[1] == w[1] && b_rows == w[0],
                4 => a.len() == 4 && b.len() == 4 && a[1] == w[1] && a[2..] == w[2..] && b_rows == w[0] && b[2..] == [1, 1],
                _ => false,
            };
            if !fits {
                out.misfit.push((p.down.clone(), format!("`{weight}` is {w:?} in `{comp}`; A is {a:?}, B {b:?}")));
                fitted.clear();
                break;
            }
            let up_rows = (p.split.len() > 1).then_some((start, n));
            start += n;
            fitted.push(Resolved {
                component: comp.to_string(),
                weight,
                down: p.down.clone(),
                up: p.up.clone(),
                rank: p.rank,
                alpha: p.alpha.clone(),
                up_rows,
                bake: p.bake,
                swap_up_halves: p.swap_up_halves,
            });
        }
        out.resolved.extend(fitted);
    }
    out
}

/// A scalar `.alpha` tensor's value (F32, F16, BF16 or F64), read from the file.
pub fn read_alpha(lora: &LoraFile, name: &str) -> Result<f64, CheckpointError> {
    use super::safetensors::Dtype;
    use std::io::{Read, Seek, SeekFrom};
    let t = lora.header.get(name).ok_or_else(|| CheckpointError::tensor(&lora.path, name, "not in the file"))?;
    if t.numel() != 1 {
        return Err(CheckpointError::tensor(&lora.path, name, format!("an alpha must be one number, this has shape {:?}", t.shape)));
    }
    let mut f = super::safetensors::open_regular(&lora.path)?;
    let mut b = vec![0u8; t.nbytes() as usize];
    f.seek(SeekFrom::Start(lora.header.data_start + t.data_offsets.0)).and_then(|_| f.read_exact(&mut b)).map_err(|e| CheckpointError::io(&lora.path, e))?;
    let v = match t.dtype {
        Dtype::F32 => f32::from_le_bytes(b[..4].try_into().expect("4")) as f64,
        Dtype::F64 => f64::from_le_bytes(b[..8].try_into().expect("8")),
        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        d => return Err(CheckpointError::tensor(&lora.path, name, format!("an alpha of dtype {d} (expected a float)"))),
    };
    if !v.is_finite() {
        return Err(CheckpointError::tensor(&lora.path, name, format!("alpha is {v}")));
    }
    Ok(v)
}

/// `runner inspect FILE` of a LoRA file: format, ranks, alphas, target components, key count.
#[derive(Debug, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub format: Format,
    pub keys: usize,
    pub pairs: usize,
    pub ranks: Vec<u64>,
    /// Distinct alpha values (none: alpha = rank).
    pub alphas: Vec<f64>,
    /// Pairs per target (`denoiser` for the UNet/transformer).
    pub targets: BTreeMap<String, usize>,
}

/// Whether a safetensors file's keys look like a LoRA's (for `runner inspect`).
pub fn looks_like_lora(h: &Header) -> bool {
    h.tensors.iter().any(|t| {
        let n = &t.name;
        n.contains("lora_A") || n.contains("lora_down") || n.contains("lora.down") || n.contains("lora_linear_layer") || (n.contains(".processor.") && n.contains("_lora"))
    })
}

pub fn inspect(path: &Path) -> Result<Report, CheckpointError> {
    let f = open(path)?;
    let mut ranks: Vec<u64> = f.pairs.iter().map(|p| p.rank).collect();
    ranks.sort();
    ranks.dedup();
    let mut alphas = vec![];
    for p in &f.pairs {
        if let Some(a) = &p.alpha {
            let v = read_alpha(&f, a)?;
            if !alphas.contains(&v) {
                alphas.push(v);
            }
        }
    }
    alphas.sort_by(f64::total_cmp);
    let mut targets = BTreeMap::new();
    for p in &f.pairs {
        let k = match &p.owner {
            Owner::Denoiser => "denoiser".to_string(),
            Owner::Component(c) => c.clone(),
        };
        *targets.entry(k).or_insert(0) += 1;
    }
    Ok(Report { path: f.path.clone(), format: f.format, keys: f.header.tensors.len(), pairs: f.pairs.len(), ranks, alphas, targets })
}

pub fn render_table(r: &Report) -> String {
    let mut s = format!("{} (LoRA, {} format)\n", r.path.display(), r.format.as_str());
    s.push_str(&format!("{} keys, {} low-rank pairs; rank {}\n", r.keys, r.pairs, r.ranks.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")));
    s.push_str(&format!("alpha: {}\n", if r.alphas.is_empty() { "none (alpha = rank: scale 1.0)".to_string() } else { r.alphas.iter().map(|a| format!("{a}")).collect::<Vec<_>>().join(", ") }));
    s.push_str("targets:\n");
    for (t, n) in &r.targets {
        s.push_str(&format!("  {t:<16} {n} pairs\n"));
    }
    s
}

/// One pair to merge into a weight: `W += scaling × B @ A` (diffusers' `fuse_lora`, PEFT's merge).
#[derive(Debug, Clone)]
pub struct FuseItem {
    pub adapter: String,
    pub file: PathBuf,
    pub weight: String,
    pub down: String,
    pub up: String,
    /// `scale × alpha / rank` (`/ sqrt(rank)` with rsLoRA).
    pub scaling: f64,
    /// Elements of A and B together (a live pair's weights).
    pub params: u64,
    /// Factors multiplied into A and B at their file dtype when read (kohya FLUX's baked alpha; 1.0: none).
    pub down_mul: f64,
    pub up_mul: f64,
    /// The rows of B this weight takes (start, count).
    pub up_rows: Option<(u64, u64)>,
    /// B's two row halves swapped.
    pub swap_up_halves: bool,
}

/// The factors kohya's FLUX converter multiplies into A and B for `alpha / rank` (`scale_down`,
/// `scale_up`: the scale moved onto A, halved onto B while A's part is under half of B's). With
/// [`Bake::Tensor`], the ratio is computed at the alpha's dtype, as torch divides a tensor.
pub fn bake_factors(lora: &LoraFile, r: &Resolved) -> Result<(f64, f64), CheckpointError> {
    use super::safetensors::Dtype;
    let Some(bake) = r.bake else { return Ok((1.0, 1.0)) };
    let rank = r.rank as f64;
    let scale = match &r.alpha {
        None => 1.0,
        Some(a) => {
            let v = read_alpha(lora, a)?;
            match (bake, lora.header.get(a).map(|t| t.dtype)) {
                (Bake::Item, _) | (Bake::Tensor, Some(Dtype::F64)) => v / rank,
                (Bake::Tensor, Some(Dtype::F16)) => half::f16::from_f32(v as f32 / rank as f32).to_f64(),
                (Bake::Tensor, Some(Dtype::BF16)) => half::bf16::from_f32(v as f32 / rank as f32).to_f64(),
                (Bake::Tensor, _) => (v as f32 / rank as f32) as f64,
            }
        }
    };
    let (mut down, mut up) = (scale, 1.0);
    while down * 2.0 < up {
        down *= 2.0;
        up /= 2.0;
    }
    Ok((down, up))
}

/// diffusers' LoRA config for one owner from the file's `lora_adapter_metadata` (what
/// `save_lora_weights` writes): `lora_alpha`, `alpha_pattern`, `use_rslora`.
struct Meta {
    alpha: f64,
    pattern: Vec<(String, f64)>,
    rslora: bool,
}

fn metadata(lora: &LoraFile, prefix: &str) -> Result<Option<Meta>, CheckpointError> {
    let Some(raw) = lora.header.metadata.get("lora_adapter_metadata") else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| bad(&lora.path, format!("`lora_adapter_metadata` is not valid JSON: {e}")))?;
    let get = |k: &str| v.get(format!("{prefix}.{k}"));
    let Some(alpha) = get("lora_alpha").and_then(serde_json::Value::as_f64) else { return Ok(None) };
    if get("use_dora").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err(bad(&lora.path, format!("`lora_adapter_metadata` sets `{prefix}.use_dora`: DoRA adapters are not supported")));
    }
    let pattern = get("alpha_pattern").and_then(serde_json::Value::as_object).map(|o| o.iter().filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a))).collect()).unwrap_or_default();
    Ok(Some(Meta { alpha, pattern, rslora: get("use_rslora").and_then(serde_json::Value::as_bool).unwrap_or(false) }))
}

/// The most common value, ties to the first seen (`collections.Counter(...).most_common()[0]`).
fn most_common(v: &[f64]) -> Option<f64> {
    let mut counts: Vec<(f64, usize)> = vec![];
    for &x in v {
        match counts.iter_mut().find(|(y, _)| *y == x) {
            Some(c) => c.1 += 1,
            None => counts.push((x, 1)),
        }
    }
    let best = counts.iter().map(|c| c.1).max()?;
    counts.into_iter().find(|c| c.1 == best).map(|c| c.0)
}

/// Each resolved pair's scaling as diffusers computes it (`get_peft_kwargs`, PEFT's `set_scale`):
/// with the file's `lora_adapter_metadata`, its `lora_alpha` (or the `alpha_pattern` entry whose
/// key ends the module's name) over the rank; else per component, an `.alpha` tensor where the
/// pair has one, else the most common alpha of the component's pairs, and without any alpha the
/// pair's own rank (scaling 1); times `scale`.
pub fn scalings(lora: &LoraFile, resolved: &[Resolved], scale: f64) -> Result<Vec<f64>, CheckpointError> {
    // kohya FLUX bakes alpha into the weights and XLabs has none: diffusers loads both with no
    // alphas, each pair at alpha = its rank.
    if matches!(lora.format, Format::KohyaFlux | Format::Xlabs) {
        return Ok(vec![scale; resolved.len()]);
    }
    let pair_of = |r: &Resolved| lora.pairs.iter().find(|p| p.down == r.down).expect("resolved from the file");
    let prefix = |r: &Resolved| -> String {
        match &pair_of(r).owner {
            Owner::Denoiser => {
                let any = |p: &str| lora.header.metadata.get("lora_adapter_metadata").is_some_and(|m| m.contains(&format!("\"{p}.lora_alpha\"")));
                if any("transformer") {
                    "transformer".into()
                } else {
                    "unet".into()
                }
            }
            Owner::Component(c) => c.clone(),
        }
    };
    // Each `.alpha` read once, each owner's metadata parsed once, each component's default once
    // (a kohya SDXL file has ~700 pairs).
    let mut alpha_of: BTreeMap<&str, f64> = BTreeMap::new();
    for r in resolved {
        if let Some(a) = &r.alpha {
            alpha_of.insert(a.as_str(), read_alpha(lora, a)?);
        }
    }
    let mut metas: BTreeMap<String, Option<Meta>> = BTreeMap::new();
    let mut defaults: BTreeMap<&str, f64> = BTreeMap::new();
    let mut out = Vec::with_capacity(resolved.len());
    for r in resolved {
        let p = pair_of(r);
        let rank = r.rank as f64;
        let module = p.module.as_str();
        let prefix = prefix(r);
        if !metas.contains_key(&prefix) {
            let m = metadata(lora, &prefix)?;
            metas.insert(prefix.clone(), m);
        }
        let (alpha, rslora) = match &metas[&prefix] {
            Some(m) => {
                let a = m.pattern.iter().find(|(k, _)| module == k || module.ends_with(&format!(".{k}"))).map_or(m.alpha, |(_, a)| *a);
                (a, m.rslora)
            }
            None => {
                // diffusers 0.42 (`get_peft_kwargs`): pairs without an alpha take the component's
                // most common alpha; a component with none keeps alpha = each pair's own rank.
                let fallback = *defaults.entry(r.component.as_str()).or_insert_with(|| {
                    let alphas: Vec<f64> = resolved.iter().filter(|o| o.component == r.component).filter_map(|o| o.alpha.as_deref().map(|a| alpha_of[a])).collect();
                    most_common(&alphas).unwrap_or(f64::NAN)
                });
                (r.alpha.as_deref().map_or(if fallback.is_nan() { rank } else { fallback }, |a| alpha_of[a]), false)
            }
        };
        out.push(scale * alpha / if rslora { rank.sqrt() } else { rank });
    }
    Ok(out)
}

/// What `adapters` (name, file, scale, components) change in each component's weights, in adapter
/// name order: the files read and resolved against `components` (name, class, checkpoint) as
/// `validate` checks them. Fused adapters are merged with these; live ones run beside the layers.
pub fn fuse_plan(adapters: &[(String, PathBuf, f64, Option<Vec<String>>)], components: &[(&str, &str, &Checkpoint)]) -> Result<BTreeMap<String, Vec<FuseItem>>, CheckpointError> {
    let mut out: BTreeMap<String, Vec<FuseItem>> = BTreeMap::new();
    for (name, path, scale, only) in adapters {
        let f = open(path)?;
        let r = resolve(&f, components, only.as_deref());
        let s = scalings(&f, &r.resolved, *scale)?;
        for (res, scaling) in r.resolved.into_iter().zip(s) {
            let numel = |t: &str| f.header.get(t).map_or(0, TensorInfo::numel);
            let params = numel(&res.down) + res.up_rows.map_or(numel(&res.up), |(_, n)| n * res.rank);
            let (down_mul, up_mul) = bake_factors(&f, &res)?;
            out.entry(res.component.clone()).or_default().push(FuseItem {
                adapter: name.clone(),
                file: path.clone(),
                weight: res.weight,
                down: res.down,
                up: res.up,
                scaling,
                params,
                down_mul,
                up_mul,
                up_rows: res.up_rows,
                swap_up_halves: res.swap_up_halves,
            });
        }
    }
    Ok(out)
}

/// A1111's hash of a LoRA file (`addnet_hash_safetensors`): sha256 of the bytes after the
/// safetensors header, so that metadata edits keep it; its `Lora hashes` field shows 12 digits.
pub fn a1111_hash(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    f.seek(SeekFrom::Start(8 + u64::from_le_bytes(n)))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The manifest's adapters as [`fuse_plan`] takes them: `live` picks `fuse = false` ones (their
/// scaling without the scale, which each run supplies), else the fused ones.
pub fn manifest_adapters(m: &crate::manifest::LoadedManifest, live: bool) -> Vec<(String, PathBuf, f64, Option<Vec<String>>)> {
    m.manifest
        .adapters
        .iter()
        .filter(|(_, a)| (a.fuse == Some(false)) == live)
        .map(|(name, a)| (name.clone(), m.resolve_path(&format!("adapters.{name}.source"), &a.source), if live { 1.0 } else { a.scale.unwrap_or(1.0) }, a.components.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::sgm_to_diffusers as m;

    #[test]
    fn kohya_flux_names_convert_as_diffusers_converts_them() {
        use super::{comfy_to_kohya, kohya_flux_module, Bake};
        assert_eq!(comfy_to_kohya("diffusion_model.double_blocks.3.img_attn.qkv.lora_down.weight"), "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight");
        assert_eq!(comfy_to_kohya("diffusion_model.final_layer.adaLN_modulation.1.alpha"), "lora_unet_final_layer_adaLN_modulation_1.alpha");
        assert_eq!(comfy_to_kohya("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up.weight"), "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight");
        let (t, bake, swap) = kohya_flux_module("single_blocks_37_linear1").unwrap();
        assert_eq!(t, ["single_transformer_blocks.37.attn.to_q", "single_transformer_blocks.37.attn.to_k", "single_transformer_blocks.37.attn.to_v", "single_transformer_blocks.37.proj_mlp"]);
        assert_eq!((bake, swap), (Some(Bake::Tensor), false));
        assert_eq!(kohya_flux_module("double_blocks_0_txt_mod_lin").unwrap().0, ["transformer_blocks.0.norm1_context.linear"]);
        assert_eq!(kohya_flux_module("final_layer_adaLN_modulation_1").unwrap(), (vec!["norm_out.linear".to_string()], None, true));
        assert_eq!(kohya_flux_module("time_in_out_layer").unwrap().0, ["time_text_embed.timestep_embedder.linear_2"]);
        assert!(kohya_flux_module("double_blocks_0_img_attn_norm").is_none());
    }

    #[test]
    fn sgm_names_map_as_diffusers_maps_them() {
        // SDXL: 2 resnets per down block.
        assert_eq!(m("input_blocks_4_1_transformer_blocks_0_attn1_to_k", 2), "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k");
        assert_eq!(m("input_blocks_5_0_in_layers_2", 2), "down_blocks_1_resnets_1_conv1");
        assert_eq!(m("input_blocks_3_0_op", 2), "down_blocks_0_downsamplers_0_conv");
        assert_eq!(m("input_blocks_4_0_skip_connection", 2), "down_blocks_1_resnets_0_conv_shortcut");
        assert_eq!(m("input_blocks_0_0", 2), "conv_in");
        assert_eq!(m("middle_block_1_proj_in", 2), "mid_block_attentions_0_proj_in");
        assert_eq!(m("middle_block_2_emb_layers_1", 2), "mid_block_resnets_1_time_emb_proj");
        assert_eq!(m("output_blocks_2_2_conv", 2), "up_blocks_0_upsamplers_0_conv");
        assert_eq!(m("output_blocks_4_0_out_layers_3", 2), "up_blocks_1_resnets_1_conv2");
        assert_eq!(m("output_blocks_5_1_proj_out", 2), "up_blocks_1_attentions_2_proj_out");
        assert_eq!(m("time_embed_0", 2), "time_embedding_linear_1");
        assert_eq!(m("label_emb_0_2", 2), "add_embedding_linear_2");
        assert_eq!(m("out_2", 2), "conv_out");
        assert_eq!(m("down_blocks_0_attentions_0_proj_in", 2), "down_blocks_0_attentions_0_proj_in");
    }
}
