//! The diffusers folder layout: `model_index.json` naming components, one subfolder each, and
//! the weight files inside, with variants resolved the way diffusers and transformers do
//! (diffusers `_fetch_index_file`/`_get_model_file`, transformers `_get_resolved_checkpoint_files`,
//! pipeline-level `_identify_model_variants`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::gguf::{Family, GgmlType, KeyStyle};
use super::index::{read_index, ShardIndex};
use super::safetensors::{read_header, Header, TensorInfo};
use super::CheckpointError;

/// Which library saved a component: it decides the weight file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// `diffusion_pytorch_model[.variant].safetensors`, index tried before the single file.
    Diffusers,
    /// `model[.variant].safetensors`, single file tried before the index.
    Transformers,
}

impl Library {
    pub fn weights_stem(self) -> &'static str {
        match self {
            Library::Diffusers => "diffusion_pytorch_model",
            Library::Transformers => "model",
        }
    }

    /// From a `model_index.json` library name. `stable_diffusion` (SD 1.5's safety checker) is a
    /// transformers model saved by transformers.
    pub fn from_index(library: &str) -> Library {
        match library {
            "diffusers" => Library::Diffusers,
            _ => Library::Transformers,
        }
    }

    /// From a weight file's name (`model.safetensors`, `diffusion_pytorch_model-00001-...`).
    pub fn from_file_name(name: &str) -> Library {
        if name.starts_with("diffusion_pytorch_model") {
            Library::Diffusers
        } else if name.starts_with("model") {
            Library::Transformers
        } else {
            Library::Diffusers
        }
    }

    /// Guesses from the files of a folder.
    pub fn detect_in(dir: &Path) -> Option<Library> {
        Library::detect(dir)
    }

    /// Guesses from the files of a folder given as a component `source`.
    fn detect(dir: &Path) -> Option<Library> {
        Library::detect_names(&file_names(dir))
    }

    /// Guesses from file names.
    pub fn detect_names(names: &[String]) -> Option<Library> {
        if names.iter().any(|n| n.starts_with("diffusion_pytorch_model")) {
            Some(Library::Diffusers)
        } else if names.iter().any(|n| n.starts_with("model.") || n.starts_with("model-")) {
            Some(Library::Transformers)
        } else {
            None
        }
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file() || t.is_symlink()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Where a component's weights are.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    Single(PathBuf),
    Sharded(ShardIndex),
    /// One GGUF file (FLUX.1 or SD3/SD3.5 transformer; its config from the pipeline folder).
    Gguf(PathBuf),
}

impl WeightFiles {
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            WeightFiles::Single(p) | WeightFiles::Gguf(p) => vec![p.clone()],
            WeightFiles::Sharded(i) => i.shard_paths(),
        }
    }

    /// The file a user named for these weights: the single file, the index or the GGUF file.
    pub fn named(&self) -> &Path {
        match self {
            WeightFiles::Single(p) | WeightFiles::Gguf(p) => p,
            WeightFiles::Sharded(i) => &i.path,
        }
    }
}

/// The weight files chosen for a component, the variant they are, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedWeights {
    pub files: WeightFiles,
    /// The variant actually read (`None`: the plain files).
    pub variant: Option<String>,
    /// What a user should know about the choice (e.g. a variant fallback).
    pub notes: Vec<String>,
}

/// Variant names present in a folder: the second dot-separated piece of weight file names
/// (`model.fp16.safetensors`, `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`,
/// legacy `diffusion_pytorch_model-00001-of-00002.fp16.safetensors`, `....index.fp16.json`).
pub fn variants_in(dir: &Path) -> Vec<String> {
    variants_of(&file_names(dir))
}

fn variants_of(names: &[String]) -> Vec<String> {
    let mut out = vec![];
    for name in names {
        let stem_ok = name.starts_with("diffusion_pytorch_model") || name.starts_with("model");
        if !stem_ok || !(name.ends_with(".safetensors") || name.ends_with(".json") || name.ends_with(".bin")) {
            continue;
        }
        let parts: Vec<&str> = name.split('.').collect();
        let candidate = if name.contains(".index.") && name.ends_with(".json") {
            // x.safetensors.index.fp16.json / legacy x.safetensors.fp16.index.json
            parts.iter().rev().nth(1).filter(|p| **p != "index").or_else(|| parts.iter().rev().nth(2).filter(|p| **p != "safetensors")).copied()
        } else if parts.len() >= 3 {
            Some(parts[1].split('-').next().unwrap_or(parts[1]))
        } else {
            None
        };
        if let Some(v) = candidate.filter(|v| !v.is_empty() && *v != "safetensors" && *v != "index" && *v != "bin") {
            if !out.iter().any(|o| o == v) {
                out.push(v.to_string());
            }
        }
    }
    out.sort();
    out
}

/// How to treat a missing variant: pipelines fall back per component; an explicit source errs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantPolicy {
    FallBack,
    Require,
}

/// Resolves a component `source`: a folder, a `*.index.json` or a single `.safetensors` file.
pub fn resolve_source(path: &Path, library: Option<Library>, variant: Option<&str>, policy: VariantPolicy) -> Result<ResolvedWeights, CheckpointError> {
    let meta = std::fs::metadata(path).map_err(|e| CheckpointError::io(path, e))?;
    if meta.is_dir() {
        return resolve_folder(path, library, variant, policy);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".json") {
        Ok(ResolvedWeights { files: WeightFiles::Sharded(read_index(path)?), variant: None, notes: vec![] })
    } else if name.ends_with(".safetensors") {
        Ok(ResolvedWeights { files: WeightFiles::Single(path.to_path_buf()), variant: None, notes: vec![] })
    } else if name.ends_with(".gguf") {
        let mut notes = vec![];
        match (variant, policy) {
            (Some(v), VariantPolicy::Require) => {
                return Err(CheckpointError::format(path, format!("variant `{v}` picks among a folder's weight files; a .gguf file is one file (remove the component's `variant`)")))
            }
            (Some(v), VariantPolicy::FallBack) => notes.push(format!("`{}` is a GGUF file: the pipeline's variant `{v}` does not apply to it", path.display())),
            (None, _) => {}
        }
        Ok(ResolvedWeights { files: WeightFiles::Gguf(path.to_path_buf()), variant: None, notes })
    } else {
        Err(CheckpointError::format(path, "expected a folder, a `*.safetensors.index.json`, a `.safetensors` or a `.gguf` file"))
    }
}

/// Picks a component folder's weight files.
pub fn resolve_folder(dir: &Path, library: Option<Library>, variant: Option<&str>, policy: VariantPolicy) -> Result<ResolvedWeights, CheckpointError> {
    let pick = pick_weights(dir, &file_names(dir), library, variant, policy)?;
    let path = dir.join(&pick.name);
    let files = if pick.is_index { WeightFiles::Sharded(read_index(&path)?) } else { WeightFiles::Single(path) };
    Ok(ResolvedWeights { files, variant: pick.variant, notes: pick.notes })
}

/// The weight file [`resolve_folder`] reads among a folder's file `names` (on disk, or a Hub
/// listing for `runner pull`): a single file or an index.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub name: String,
    pub is_index: bool,
    pub variant: Option<String>,
    pub notes: Vec<String>,
}

/// diffusers' choice among weight file names: with a variant, its files when the folder has
/// any (`_identify_model_variants`), else the plain files (with a note), or an error under
/// [`VariantPolicy::Require`]; the index before the single file for diffusers models, the
/// reverse for transformers ones.
pub fn pick_weights(dir: &Path, names: &[String], library: Option<Library>, variant: Option<&str>, policy: VariantPolicy) -> Result<Pick, CheckpointError> {
    let library = library.or_else(|| Library::detect_names(names)).unwrap_or(Library::Diffusers);
    let stem = library.weights_stem();
    let mut notes = vec![];
    let candidates = |v: Option<&str>| -> Vec<(String, bool)> {
        let (single, index, legacy_index) = match v {
            Some(v) => (format!("{stem}.{v}.safetensors"), format!("{stem}.safetensors.index.{v}.json"), Some(format!("{stem}.safetensors.{v}.index.json"))),
            None => (format!("{stem}.safetensors"), format!("{stem}.safetensors.index.json"), None),
        };
        let mut c = match library {
            Library::Diffusers => vec![(index, true), (single, false)],
            Library::Transformers => vec![(single, false), (index, true)],
        };
        if let Some(l) = legacy_index {
            c.push((l, true));
        }
        c
    };
    let pick = |cands: &[(String, bool)]| cands.iter().find(|(n, _)| names.contains(n)).cloned();

    if let Some(v) = variant {
        let cands = candidates(Some(v));
        if names.iter().any(|n| n.split('.').nth(1).is_some_and(|p| p.starts_with(v))) {
            if let Some((name, is_index)) = pick(&cands) {
                return Ok(Pick { name, is_index, variant: Some(v.to_string()), notes });
            }
            return Err(not_found(dir, names, &cands, &format!("files of variant `{v}` are present but none of the weight files runner reads")));
        }
        if policy == VariantPolicy::Require {
            return Err(not_found(dir, names, &cands, &format!("no `{v}` variant weights")));
        }
        let found = variants_of(names);
        let others = if found.is_empty() { String::new() } else { format!(" (variants present: {})", found.join(", ")) };
        notes.push(format!("no `{v}` variant in `{}`{others}: using the non-variant weights, as diffusers does", dir.display()));
    }
    let cands = candidates(None);
    match pick(&cands) {
        Some((name, is_index)) => Ok(Pick { name, is_index, variant: None, notes }),
        None => Err(not_found(dir, names, &cands, "no safetensors weights")),
    }
}

fn not_found(dir: &Path, names: &[String], tried: &[(String, bool)], what: &str) -> CheckpointError {
    let tried: Vec<String> = tried.iter().map(|(n, _)| format!("`{n}`")).collect();
    let mut msg = format!("{what}: looked for {}", tried.join(", "));
    let pickles: Vec<&str> = names.iter().map(String::as_str).filter(|n| n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt")).collect();
    if !pickles.is_empty() {
        msg.push_str(&format!("; found pickle files ({}), which runner does not load: convert them to safetensors", pickles.join(", ")));
    }
    if names.is_empty() {
        msg = format!("{what}: the folder is empty");
    }
    CheckpointError::format(dir, msg)
}

/// One tensor of a checkpoint and the file holding it.
#[derive(Debug, Clone)]
pub struct TensorLoc {
    pub file: usize,
    /// Where its bytes are. A GGUF-quantized tensor is `U8` bytes of its byte shape (rows, then
    /// the bytes of a row), as gguf-py and diffusers hold one; its type and shape are in `quant`.
    pub info: TensorInfo,
    pub quant: Option<Quantized>,
    /// diffusers' `swap_scale_shift`: the loaded rows' two halves are exchanged.
    pub swap_halves: bool,
}

/// A GGUF tensor kept in its ggml type (quantized, or BF16: diffusers dequantizes both in the
/// forward, never at load).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub ggml_type: GgmlType,
    /// The tensor's own (torch-order) shape.
    pub shape: Vec<u64>,
}

impl TensorLoc {
    fn plain(file: usize, info: TensorInfo) -> TensorLoc {
        TensorLoc { file, info, quant: None, swap_halves: false }
    }

    /// The tensor's shape (a quantized tensor's own, not its bytes').
    pub fn shape(&self) -> &[u64] {
        self.quant.as_ref().map_or(&self.info.shape, |q| &q.shape)
    }

    pub fn numel(&self) -> u64 {
        self.shape().iter().product()
    }

    /// Whether it holds floating-point values (quantized ones included).
    pub fn is_float(&self) -> bool {
        self.quant.is_some() || self.info.dtype.is_float()
    }

    /// Bytes of its compute-dtype copy (`float_bytes` per element): a quantized weight's
    /// dequantized copy in the forward.
    pub fn dequantized_bytes(&self, float_bytes: u64) -> u64 {
        self.numel() * float_bytes
    }
}

/// A component's weights, checked across shards, from headers alone.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub weights: ResolvedWeights,
    pub files: Vec<(PathBuf, Header)>,
    pub tensors: BTreeMap<String, TensorLoc>,
    /// A GGUF file's transformer family and the key names it had.
    pub gguf: Option<(Family, KeyStyle)>,
}

impl Checkpoint {
    /// Reads every header and cross-checks an index against its shards.
    pub fn open(weights: ResolvedWeights) -> Result<Checkpoint, CheckpointError> {
        let mut files = vec![];
        let mut tensors: BTreeMap<String, TensorLoc> = BTreeMap::new();
        let mut weights = weights;
        if let WeightFiles::Gguf(p) = &weights.files {
            let (files, tensors, gguf) = open_gguf(p)?;
            return Ok(Checkpoint { weights, files, tensors, gguf: Some(gguf) });
        }
        match &weights.files {
            WeightFiles::Gguf(_) => unreachable!("opened above"),
            WeightFiles::Single(p) => {
                let h = read_header(p)?;
                for t in &h.tensors {
                    tensors.insert(t.name.clone(), TensorLoc::plain(0, t.clone()));
                }
                files.push((p.clone(), h));
            }
            WeightFiles::Sharded(index) => {
                let dir = index.path.parent().unwrap_or(Path::new("."));
                for (i, name) in index.shard_names().into_iter().enumerate() {
                    let p = dir.join(name);
                    if !p.exists() {
                        return Err(CheckpointError::format(&index.path, format!("names shard `{name}`, which does not exist in `{}`", dir.display())));
                    }
                    let h = read_header(&p)?;
                    for t in &h.tensors {
                        match index.weight_map.get(&t.name) {
                            None => return Err(CheckpointError::tensor(&p, &t.name, format!("is in this shard but `{}` does not list it", index.path.display()))),
                            Some(s) if s != name => return Err(CheckpointError::tensor(&p, &t.name, format!("is in this shard but `{}` maps it to `{s}`", index.path.display()))),
                            Some(_) => {}
                        }
                        if let Some(prev) = tensors.insert(t.name.clone(), TensorLoc::plain(i, t.clone())) {
                            let other = &files.get(prev.file).map(|(p, _): &(PathBuf, Header)| p.display().to_string()).unwrap_or_default();
                            return Err(CheckpointError::tensor(&p, &t.name, format!("is also in `{other}`: a weight must be in one shard")));
                        }
                    }
                    files.push((p, h));
                }
                for (t, shard) in &index.weight_map {
                    if !tensors.contains_key(t) {
                        return Err(CheckpointError::tensor(&dir.join(shard), t, format!("is missing: `{}` maps it to this shard", index.path.display())));
                    }
                }
                let stored: u64 = tensors.values().map(|t| t.info.nbytes()).sum();
                if let Some(total) = index.total_size.filter(|&t| t != stored) {
                    weights.notes.push(format!("`{}` says total_size {total} but its shards hold {stored} bytes of tensors", index.path.display()));
                }
            }
        }
        Ok(Checkpoint { weights, files, tensors, gguf: None })
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Elements of floating-point tensors (parameters and float buffers, quantized ones included).
    pub fn parameters(&self) -> u64 {
        self.tensors.values().filter(|t| t.is_float()).map(TensorLoc::numel).sum()
    }

    /// Bytes as stored, per safetensors dtype (per ggml type for quantized GGUF tensors).
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for t in self.tensors.values() {
            let name = t.quant.as_ref().map_or(t.info.dtype.name(), |q| q.ggml_type.name());
            *m.entry(name.to_string()).or_insert(0) += t.info.nbytes();
        }
        m
    }

    /// The largest quantized weight's compute-dtype copy (`float_bytes` per element), alive while
    /// its layer runs (diffusers' `GGUFLinear` dequantizes one weight per forward).
    pub fn largest_dequantized(&self, float_bytes: u64) -> u64 {
        self.tensors.values().filter(|t| t.quant.is_some()).map(|t| t.dequantized_bytes(float_bytes)).max().unwrap_or(0)
    }

    pub fn stored_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.info.nbytes()).sum()
    }

    /// Exact bytes once loaded with floats cast to `float_bytes` per element (integer tensors
    /// such as `position_ids` keep their type, as `model.to(dtype)` does).
    pub fn bytes_at(&self, float_bytes: u64) -> u64 {
        self.tensors.values().map(|t| t.info.nbytes_as(float_bytes)).sum()
    }
}

/// A GGUF transformer's tensors under diffusers' names: original names converted as diffusers'
/// converters do ([`super::convert`]), each split a byte range of the file (a quantized tensor's
/// blocks run along its rows, so rows are bytes). Checked from the header alone: supported types,
/// a recognisable FLUX or SD3 layout, row ranges on whole blocks.
#[allow(clippy::type_complexity)]
fn open_gguf(path: &Path) -> Result<(Vec<(PathBuf, Header)>, BTreeMap<String, TensorLoc>, (Family, KeyStyle)), CheckpointError> {
    use super::convert::{to_diffusers, Piece};
    use super::gguf::{detect, strip_prefix};
    use super::safetensors::Dtype;
    let f = super::gguf::read(path)?;
    f.check_supported()?;
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let (family, style) = detect(&names).ok_or_else(|| {
        CheckpointError::format(path, "neither a FLUX.1 nor an SD3/SD3.5 transformer (no `double_blocks.0.img_attn.norm.key_norm.scale`, `joint_blocks.0...`, or diffusers' `transformer_blocks.*` names): runner loads GGUF transformers of those families only")
    })?;
    let pieces: BTreeMap<String, Piece> = match style {
        KeyStyle::Original => {
            let shapes = f.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
            to_diffusers(family, &shapes).map_err(|m| CheckpointError::format(path, format!("as an original-named {} transformer: {m}", family.as_str())))?
        }
        KeyStyle::Diffusers => f.tensors.iter().map(|t| (strip_prefix(&t.name).to_string(), Piece { source: t.name.clone(), rows: None, swap_halves: false })).collect(),
    };
    let by_name: BTreeMap<&str, &super::gguf::TensorInfo> = f.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut tensors = BTreeMap::new();
    for (name, piece) in pieces {
        let t = by_name[piece.source.as_str()];
        let gt = t.ggml_type;
        let total = t.shape.first().copied().unwrap_or(1);
        let (r0, n) = piece.rows.unwrap_or((0, total));
        // The byte offset of row `r`: rows of whole blocks in 2-D and up; a 1-D tensor's rows are
        // its elements, so a split must fall on a block boundary.
        let offset = |r: u64| -> Result<u64, CheckpointError> {
            if t.shape.len() >= 2 {
                Ok(r * (t.n_bytes / total.max(1)))
            } else if r % gt.block_size() == 0 {
                Ok(r / gt.block_size() * gt.type_size())
            } else {
                Err(CheckpointError::tensor(path, &t.name, format!("element {r} is not on a {gt} block boundary: the tensor cannot be split there without dequantizing it")))
            }
        };
        let (start, end) = (t.start + offset(r0)?, t.start + offset(r0 + n)?);
        if piece.swap_halves {
            offset(r0 + n / 2)?;
        }
        let mut shape = t.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = n;
        }
        let (dtype, info_shape, quant) = match gt {
            GgmlType::F32 => (Dtype::F32, shape, None),
            GgmlType::F16 => (Dtype::F16, shape, None),
            _ => {
                let mut bytes = shape.clone();
                if let Some(last) = bytes.last_mut() {
                    *last = *last / gt.block_size() * gt.type_size();
                }
                (Dtype::U8, bytes, Some(Quantized { ggml_type: gt, shape }))
            }
        };
        let info = TensorInfo { name: name.clone(), dtype, shape: info_shape, data_offsets: (start, end) };
        tensors.insert(name, TensorLoc { file: 0, info, quant, swap_halves: piece.swap_halves });
    }
    // Offsets are absolute: the header's data section starts at the file's first byte.
    let header = Header { tensors: vec![], metadata: BTreeMap::new(), data_start: 0, data_len: f.file_len };
    Ok((vec![(path.to_path_buf(), header)], tensors, (family, style)))
}

/// The transformer family a model class is, for the classes a GGUF file can be the source of.
pub fn gguf_family(class: &str) -> Option<Family> {
    match class {
        "FluxTransformer2DModel" => Some(Family::Flux),
        "SD3Transformer2DModel" => Some(Family::Sd3),
        _ => None,
    }
}

/// `model_index.json`: component name -> (library, class); `null` or `[null, null]` = absent.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIndex {
    pub path: PathBuf,
    pub class_name: Option<String>,
    pub diffusers_version: Option<String>,
    pub components: BTreeMap<String, Option<(String, String)>>,
    /// Pipeline config values that are not components (`force_zeros_for_empty_prompt`, ...).
    pub config: BTreeMap<String, serde_json::Value>,
}

pub fn read_model_index(root: &Path) -> Result<ModelIndex, CheckpointError> {
    let path = root.join("model_index.json");
    if !root.is_dir() {
        return Err(CheckpointError::format(root, if root.exists() { "is not a folder: expected a diffusers pipeline folder" } else { "does not exist" }));
    }
    if !path.is_file() {
        let what = if file_names(root).is_empty() && std::fs::read_dir(root).map(|mut d| d.next().is_none()).unwrap_or(false) { "the folder is empty" } else { "no `model_index.json`" };
        return Err(CheckpointError::format(root, format!("{what}: not a diffusers pipeline folder")));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| CheckpointError::format(&path, format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| CheckpointError::format(&path, "expected a JSON object"))?;
    let mut out = ModelIndex { path: path.clone(), class_name: None, diffusers_version: None, components: BTreeMap::new(), config: BTreeMap::new() };
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("_class_name", serde_json::Value::String(s)) => out.class_name = Some(s.clone()),
            ("_diffusers_version", serde_json::Value::String(s)) => out.diffusers_version = Some(s.clone()),
            (k, _) if k.starts_with('_') => {}
            (_, serde_json::Value::Null) => {
                out.components.insert(k.clone(), None);
            }
            (_, serde_json::Value::Array(a)) if a.len() == 2 => {
                let entry = match (&a[0], &a[1]) {
                    (serde_json::Value::String(l), serde_json::Value::String(c)) => Some((l.clone(), c.clone())),
                    (serde_json::Value::Null, serde_json::Value::Null) => None,
                    _ => return Err(CheckpointError::format(&path, format!("component `{k}` must be [library, class] or null, found {v}"))),
                };
                out.components.insert(k.clone(), entry);
            }
            _ => {
                out.config.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(out)
}

/// A component's `config.json` as a JSON object. A file that is there but unreadable, cut short
/// or not an object is a broken download: an error naming it and, for bad JSON, serde's line and
/// column.
pub fn read_config(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::io(path, e))?;
    match serde_json::from_str(&text).map_err(|e| CheckpointError::format(path, format!("not valid JSON: {e}")))? {
        serde_json::Value::Object(o) => Ok(o),
        v => {
            let got = match v {
                serde_json::Value::Array(_) => "a list",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            };
            Err(CheckpointError::format(path, format!("expected a JSON object, got {got}")))
        }
    }
}

/// Whether a component holds weights (a model, saved with `config.json`), as opposed to
/// tokenizers, schedulers and image processors, which hold configs and vocabularies only.
pub fn component_has_weights(class: &str, dir: &Path) -> bool {
    let not_a_model = ["Tokenizer", "Scheduler", "ImageProcessor", "FeatureExtractor", "Processor"].iter().any(|s| class.contains(s));
    !not_a_model && dir.join("config.json").is_file()
}

/// A component of a pipeline folder.
#[derive(Debug, Clone)]
pub struct Component {
    pub name: String,
    pub library: String,
    pub class: String,
    pub dir: PathBuf,
    /// Weights, for model components.
    pub checkpoint: Option<Checkpoint>,
}

/// A pipeline folder with every model component's weights resolved and checked.
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub components: Vec<Component>,
    /// Variant fallbacks and other remarks.
    pub notes: Vec<String>,
}

/// A manifest's say over one component: weights from elsewhere, another variant, or off.
#[derive(Debug, Clone, Default)]
pub struct ComponentSpec {
    pub source: Option<PathBuf>,
    pub variant: Option<String>,
    pub enabled: Option<bool>,
}

impl PipelineFolder {
    /// Opens a pipeline folder: every component that `model_index.json` names must exist;
    /// model components must have weights. With a variant, components without that variant
    /// use their plain weights (and say so); no component at all having it is an error, as in
    /// diffusers' `_identify_model_variants`.
    pub fn open(root: &Path, variant: Option<&str>) -> Result<PipelineFolder, CheckpointError> {
        PipelineFolder::open_with(root, variant, &BTreeMap::new())
    }

    /// As [`PipelineFolder::open`], with per-component sources, variants and `enabled = false`
    /// from a manifest. A component with its own `source` need not exist in the folder.
    pub fn open_with(root: &Path, variant: Option<&str>, specs: &BTreeMap<String, ComponentSpec>) -> Result<PipelineFolder, CheckpointError> {
        let index = read_model_index(root)?;
        let mut components = vec![];
        let mut notes = vec![];
        let mut any_variant = false;
        let mut any_weights = false;
        for (name, entry) in &index.components {
            let Some((library, class)) = entry else { continue };
            let spec = specs.get(name).cloned().unwrap_or_default();
            if spec.enabled == Some(false) {
                notes.push(format!("component `{name}` is disabled by the manifest"));
                continue;
            }
            let dir = root.join(name);
            let lib = Library::from_index(library);
            let component_variant = spec.variant.as_deref().or(variant);
            let checkpoint = if let Some(src) = &spec.source {
                // An explicit variant on the component must exist; the pipeline's falls back.
                let policy = if spec.variant.is_some() { VariantPolicy::Require } else { VariantPolicy::FallBack };
                let w = resolve_source(src, Some(lib), component_variant, policy)?;
                if let WeightFiles::Gguf(p) = &w.files {
                    if gguf_family(class).is_none() {
                        return Err(CheckpointError::format(
                            p,
                            format!("component `{name}` is a {class}: a .gguf file is a source for FluxTransformer2DModel and SD3Transformer2DModel only (the transformers diffusers loads from GGUF)"),
                        ));
                    }
                }
                any_variant |= w.variant.is_some();
                any_weights = true;
                let c = Checkpoint::open(w)?;
                if let (Some((family, _)), Some(want)) = (c.gguf, gguf_family(class)) {
                    if family != want {
                        return Err(CheckpointError::format(c.weights.files.named(), format!("holds a {} transformer, but component `{name}` is a {class} ({})", family.as_str(), want.as_str())));
                    }
                }
                notes.extend(c.weights.notes.iter().cloned());
                Some(c)
            } else {
                if !dir.is_dir() {
                    return Err(CheckpointError::format(&index.path, format!("names component `{name}` ({library} {class}) but `{}` does not exist", dir.display())));
                }
                if component_has_weights(class, &dir) {
                    let policy = if spec.variant.is_some() { VariantPolicy::Require } else { VariantPolicy::FallBack };
                    let w = resolve_folder(&dir, Some(lib), component_variant, policy)?;
                    any_variant |= w.variant.is_some();
                    any_weights = true;
                    let c = Checkpoint::open(w)?;
                    notes.extend(c.weights.notes.iter().cloned());
                    Some(c)
                } else {
                    None
                }
            };
            components.push(Component { name: name.clone(), library: library.clone(), class: class.clone(), dir, checkpoint });
        }
        for name in specs.keys() {
            if !index.components.get(name).is_some_and(|e| e.is_some()) {
                notes.push(format!("the manifest configures component `{name}`, which `{}` does not list", index.path.display()));
            }
        }
        if let Some(v) = variant {
            if !any_variant && any_weights {
                return Err(CheckpointError::format(root, format!("no component has `{v}` variant weights (diffusers: \"no such modeling files are available\")")));
            }
        }
        Ok(PipelineFolder { root: root.to_path_buf(), index, components, notes })
    }

    /// Every file a run reads: `model_index.json`, each component's configs, vocabularies and
    /// weight files (index and shards), sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.index.path.clone()];
        for c in &self.components {
            match &c.checkpoint {
                Some(ck) => {
                    let cfg_dir = match &ck.weights.files {
                        // A GGUF file has no config beside it: the pipeline folder's (diffusers' `config=`).
                        WeightFiles::Gguf(_) => None,
                        WeightFiles::Single(p) => p.parent().map(Path::to_path_buf),
                        WeightFiles::Sharded(i) => {
                            out.push(i.path.clone());
                            i.path.parent().map(Path::to_path_buf)
                        }
                    };
                    out.extend(ck.files.iter().map(|(p, _)| p.clone()));
                    // The model's config: beside the weights, else in the pipeline's folder.
                    let cfg = cfg_dir.map(|d| d.join("config.json")).filter(|p| p.is_file()).unwrap_or_else(|| c.dir.join("config.json"));
                    if cfg.is_file() {
                        out.push(cfg);
                    }
                }
                None => {
                    for n in file_names(&c.dir) {
                        if n.ends_with(".json") || n.ends_with(".txt") || n.ends_with(".model") {
                            out.push(c.dir.join(n));
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}
