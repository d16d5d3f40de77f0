//! LoRA adapter files, from the safetensors header alone: the format detected from the keys and
//! each low-rank pair mapped to the component and module it changes, as diffusers' `lora_state_dict`
//! detects and converts them (loaders/lora_pipeline.py, lora_conversion_utils.py).
//!
//! Read: diffusers/PEFT (`<component>.<module>.lora_A.weight` / `lora_B`, optional `.alpha`), the
//! older diffusers names (`…to_q_lora.down.weight`, `…lora_linear_layer.up.weight`, `.processor.`)
//! and kohya's SD 1.x/2.x names (`lora_unet_<module_with_underscores>.lora_down.weight`, `lora_up`,
//! `.alpha`; `lora_te_`, `lora_te1_`, `lora_te2_` for the text encoders), whose underscores are
//! resolved against the component's own module names. Refused with a message naming the format:
//! DoRA, LoKr, LoHa, LoRA biases, kohya's FLUX and sgm (SDXL `input_blocks`) layouts and XLabs
//! FLUX files (not converted yet).

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
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Peft => "diffusers/PEFT",
            Format::Kohya => "kohya",
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

/// One low-rank pair: `down` (A, rank × in) and `up` (B, out × rank).
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub owner: Owner,
    /// The module as the file names it: a diffusers module path (PEFT) or kohya's flattened name.
    pub module: String,
    pub down: String,
    pub up: String,
    /// The `.alpha` tensor's name, when the file has one.
    pub alpha: Option<String>,
    pub rank: u64,
}

/// A LoRA file's header, format and pairs.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub header: Header,
    pub format: Format,
    pub pairs: Vec<Pair>,
}

fn bad(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::format(path, msg)
}

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
            return Err(bad(path, format!("{what} adapters are not supported: runner reads LoRA (diffusers/PEFT and kohya) files")));
        }
    }
    let kohya = !names.is_empty() && names.iter().all(|n| ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"].iter().any(|p| n.starts_with(p)));
    if (kohya && any("double_blocks")) || (any("single_blocks") && any("lora_down")) {
        return Err(bad(path, "a kohya FLUX LoRA (`lora_unet_double_blocks_…`): this layout is not converted yet (diffusers/PEFT FLUX LoRAs are read)"));
    }
    if any(".processor.") && any("qkv_lora") {
        return Err(bad(path, "an XLabs FLUX LoRA (`double_blocks.N.processor.qkv_lora1…`): this layout is not converted yet (diffusers/PEFT FLUX LoRAs are read)"));
    }
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
    let (format, pairs) = if kohya { (Format::Kohya, kohya_pairs(path, &header)?) } else { (Format::Peft, peft_pairs(path, &header)?) };
    if pairs.is_empty() {
        return Err(bad(path, "not a LoRA file: no `lora_A`/`lora_B` or `lora_down`/`lora_up` pairs"));
    }
    Ok(LoraFile { path: path.to_path_buf(), header, format, pairs })
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
        out.push(Pair { owner, module: module_path, down: down.name.clone(), up: up.name.clone(), alpha, rank });
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

fn kohya_pairs(path: &Path, h: &Header) -> Result<Vec<Pair>, CheckpointError> {
    let mut halves: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for t in &h.tensors {
        let side = t.name.strip_suffix(".lora_down.weight").map(|m| (m, true)).or_else(|| t.name.strip_suffix(".lora_up.weight").map(|m| (m, false)));
        match side {
            Some((m, down)) => {
                let e = halves.entry(m.to_string()).or_default();
                if down {
                    e.0 = Some(t);
                } else {
                    e.1 = Some(t);
                }
            }
            None if t.name.ends_with(".alpha") => {}
            None => return Err(CheckpointError::tensor(path, &t.name, "is not part of a kohya LoRA pair (`lora_down`/`lora_up`) nor an `.alpha`")),
        }
    }
    let owner = |m: &str| -> (Owner, String) {
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
    };
    pair_up(path, h, halves, |m| Some(format!("{m}.alpha")), owner)
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
/// `[out, in, k, k]` with A `[r, in, k, k]`, B `[out, r, 1, 1]`.
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
        let weight = match lora.format {
            Format::Peft => [format!("{}.weight", p.module), format!("text_model.{}.weight", p.module)].into_iter().find(|w| ck.tensors.contains_key(w)),
            Format::Kohya => {
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
                names.get(&p.module).or_else(|| names.get(&alt)).or_else(|| sgm.as_ref().and_then(|m| names.get(m))).cloned()
            }
        };
        let Some(weight) = weight else {
            out.unmatched.push(p.down.clone());
            continue;
        };
        let w = ck.tensors[&weight].shape().to_vec();
        let (a, b) = (&lora.header.get(&p.down).expect("paired").shape, &lora.header.get(&p.up).expect("paired").shape);
        let fits = match w.len() {
            2 => a.len() == 2 && b.len() == 2 && a[1] == w[1] && b[0] == w[0],
            4 => a.len() == 4 && b.len() == 4 && a[1] == w[1] && a[2..] == w[2..] && b[0] == w[0] && b[2..] == [1, 1],
            _ => false,
        };
        if !fits {
            out.misfit.push((p.down.clone(), format!("`{}` is {w:?} in `{comp}`; A is {a:?}, B {b:?}", weight)));
            continue;
        }
        out.resolved.push(Resolved { component: comp.to_string(), weight, down: p.down.clone(), up: p.up.clone(), rank: p.rank, alpha: p.alpha.clone() });
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
    h.tensors.iter().any(|t| t.name.contains("lora_A") || t.name.contains("lora_down") || t.name.contains("lora.down") || t.name.contains("lora_linear_layer"))
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
/// most common rank (so a lone pair of another rank gets `r_common / r`); times `scale`.
pub fn scalings(lora: &LoraFile, resolved: &[Resolved], scale: f64) -> Result<Vec<f64>, CheckpointError> {
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
                let fallback = *defaults.entry(r.component.as_str()).or_insert_with(|| {
                    let same: Vec<&Resolved> = resolved.iter().filter(|o| o.component == r.component).collect();
                    let alphas: Vec<f64> = same.iter().filter_map(|o| o.alpha.as_deref().map(|a| alpha_of[a])).collect();
                    most_common(&alphas).or_else(|| most_common(&same.iter().map(|o| o.rank as f64).collect::<Vec<_>>())).unwrap_or(rank)
                });
                (r.alpha.as_deref().map_or(fallback, |a| alpha_of[a]), false)
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
            let params = numel(&res.down) + numel(&res.up);
            out.entry(res.component.clone()).or_default().push(FuseItem { adapter: name.clone(), file: path.clone(), weight: res.weight, down: res.down, up: res.up, scaling, params });
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
