//! Checkpoint tensors into libtorch: files are mapped copy-on-write, and tensors whose dtype
//! is already the target's are views of the mapping (zero-copy on CPU when aligned); others
//! are converted tensor by tensor, and the pages of the source range are released right after,
//! so peak memory stays near the bytes of the result. Nothing reads a whole file into memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::layout::Checkpoint;
use super::safetensors::{Dtype, TensorInfo};
use super::CheckpointError;

/// The libtorch kind of a safetensors dtype, where libtorch has one.
pub fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F8_E5M2 => Kind::Float8e5m2,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        Dtype::F8_E4M3FNUZ => Kind::Float8e4m3fnuz,
        Dtype::F8_E5M2FNUZ => Kind::Float8e5m2fnuz,
        Dtype::C64 => Kind::ComplexFloat,
        _ => return None,
    })
}

/// Tensors of a checkpoint, some of them views of mapped files. The maps live as long as the
/// store; callers that keep a tensor beyond it take [`Tensor::copy`] (views are not owners).
pub struct TensorStore {
    tensors: BTreeMap<String, Tensor>,
    /// Names of the tensors that are views of a mapping (zero-copy).
    zero_copy: Vec<String>,
    _maps: Vec<Arc<WatchedMap>>,
}

/// Keeps the mapped files that zero-copy tensors view alive: hold it as long as the tensors.
pub struct Mapped(Vec<Arc<WatchedMap>>);

impl Mapped {
    /// Nothing mapped (every tensor left the mapping).
    pub fn none() -> Mapped {
        Mapped(vec![])
    }

    /// Whether `p` points into one of the mapped files (a zero-copy view's data).
    pub fn contains(&self, p: *const u8) -> bool {
        let p = p as usize;
        self.0.iter().any(|m| {
            let start = m.map.as_ptr() as usize;
            p >= start && p < start + m.map.len()
        })
    }
}

impl Mapped {
    /// Drops the mapped pages that `t` viewed, once its data has been copied elsewhere (pinned
    /// memory, a device) and nothing views them any more: the host then holds one copy of the
    /// weight, not two. Returns whether `t` was a view of these mappings.
    pub fn release_copied(&self, t: &Tensor) -> bool {
        let (p, len) = (t.data_ptr() as usize, t.numel() * t.kind().elt_size_in_bytes());
        for m in &self.0 {
            let start = m.map.as_ptr() as usize;
            if p >= start && p + len <= start + m.map.len() {
                release_range(&m.map, p - start, len);
                return true;
            }
        }
        false
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped({} files)", self.0.len())
    }
}

/// A mapping whose range is watched for SIGBUS (see [`super::sigbus`]) while it lives.
struct WatchedMap {
    // Dropped first: the range is unwatched before it is unmapped.
    _watch: super::sigbus::Watch,
    map: memmap2::MmapMut,
}

impl std::ops::Deref for WatchedMap {
    type Target = memmap2::MmapMut;
    fn deref(&self) -> &memmap2::MmapMut {
        &self.map
    }
}

impl TensorStore {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn zero_copy_count(&self) -> usize {
        self.zero_copy.len()
    }
    /// The tensors, and what keeps the mappings their views point into alive.
    pub fn into_parts(self) -> (BTreeMap<String, Tensor>, Mapped) {
        (self.tensors, Mapped(self._maps))
    }

    /// Moves every tensor out as an owned copy, releasing the maps.
    pub fn into_owned(self) -> BTreeMap<String, Tensor> {
        let zc: std::collections::HashSet<String> = self.zero_copy.into_iter().collect();
        self.tensors
            .into_iter()
            .map(|(k, t)| {
                if zc.contains(&k) {
                    // empty_like + copy_: one pass (tch's `copy` zero-fills first).
                    let mut c = t.empty_like();
                    c.copy_(&t);
                    (k, c)
                } else {
                    (k, t)
                }
            })
            .collect()
    }
}

/// How to load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Cast floating-point tensors to this kind (integer tensors keep theirs), like
    /// `model.to(dtype)`.
    pub float_kind: Option<Kind>,
    pub device: Device,
    /// Fault every page in at map time (`MAP_POPULATE`): tensors are ready, not lazily read.
    pub populate: bool,
}

fn map_file(path: &Path, populate: bool) -> Result<WatchedMap, CheckpointError> {
    let file = crate::checkpoint::safetensors::open_regular(path)?;
    let mut opts = memmap2::MmapOptions::new();
    if populate {
        opts.populate();
    }
    // SAFETY: a private mapping, populated read-only (page-cache pages are shared, not copied),
    // then made writable copy-on-write: libtorch may write to views without touching the file.
    // A file truncated while mapped faults on the lost pages: the watch turns that SIGBUS into
    // an error naming the file.
    let map = unsafe { opts.map_copy_read_only(&file) }.map_err(|e| CheckpointError::io(path, e))?;
    let map = map.make_mut().map_err(|e| CheckpointError::io(path, e))?;
    Ok(WatchedMap { _watch: super::sigbus::watch(map.as_ptr(), map.len(), path), map })
}

/// Half-precision <-> f32 conversion on the CPU with SIMD (F16C where present), in parallel
/// over large tensors; rounding is round-to-nearest-even, as torch's casts. Returns `None` for
/// pairs it does not handle (libtorch converts those).
fn convert_fast(src: Dtype, target: Kind, data: &[u8], shape: &[i64]) -> Option<Result<Tensor, tch::TchError>> {
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let numel = data.len() / (src.bits() / 8) as usize;
    let out_kind = match (src, target) {
        (Dtype::F16 | Dtype::BF16, Kind::Float) => Kind::Float,
        (Dtype::F32, Kind::Half | Kind::BFloat16) => target,
        _ => return None,
    };
    let out = match Tensor::f_empty(shape, (out_kind, Device::Cpu)) {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: `out` is a fresh contiguous tensor of `numel` elements of `out_kind`; `data` is
    // `numel` elements of `src`, aligned (checked by the caller).
    unsafe {
        match (src, out_kind) {
            (Dtype::F16, Kind::Float) | (Dtype::BF16, Kind::Float) => {
                let dst = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, numel);
                if src == Dtype::F16 {
                    let s = std::slice::from_raw_parts(data.as_ptr() as *const f16, numel);
                    dst.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK)).for_each(|(d, s)| s.convert_to_f32_slice(d));
                } else {
                    let s = std::slice::from_raw_parts(data.as_ptr() as *const bf16, numel);
                    dst.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK)).for_each(|(d, s)| s.convert_to_f32_slice(d));
                }
            }
            (Dtype::F32, Kind::Half) => {
                let s = std::slice::from_raw_parts(data.as_ptr() as *const f32, numel);
                let dst = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f16, numel);
                dst.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK)).for_each(|(d, s)| d.convert_from_f32_slice(s));
            }
            (Dtype::F32, Kind::BFloat16) => {
                let s = std::slice::from_raw_parts(data.as_ptr() as *const f32, numel);
                let dst = std::slice::from_raw_parts_mut(out.data_ptr() as *mut bf16, numel);
                dst.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK)).for_each(|(d, s)| d.convert_from_f32_slice(s));
            }
            _ => unreachable!(),
        }
    }
    Some(Ok(out))
}

fn shape_i64(path: &Path, t: &TensorInfo) -> Result<Vec<i64>, CheckpointError> {
    t.shape.iter().map(|&d| i64::try_from(d).map_err(|_| CheckpointError::tensor(path, &t.name, "dimension too large"))).collect()
}

/// A checkpoint's files, mapped (one per file): tensors are taken from it one at a time.
pub struct Maps(Vec<Arc<WatchedMap>>);

/// Where a zero-copy tensor's bytes lie in the mapping: its pages can be released once the
/// tensor has been copied elsewhere (e.g. to a GPU).
#[derive(Debug, Clone, Copy)]
pub struct Source {
    file: usize,
    start: usize,
    len: usize,
}

impl Maps {
    /// Maps every file of `ck` copy-on-write (`populate`: fault every page in now).
    pub fn open(ck: &Checkpoint, populate: bool) -> Result<Maps, CheckpointError> {
        Ok(Maps(ck.files.iter().map(|(p, _)| map_file(p, populate).map(Arc::new)).collect::<Result<_, _>>()?))
    }

    /// Tensor `name` on the CPU, floats cast to `float_kind`: a view of the mapping when the
    /// dtype already matches and the data is aligned (then its [`Source`] is returned); else
    /// converted once into a buffer of its own, and the source pages released.
    /// A GGUF-quantized tensor comes dequantized to `float_kind` (float32 when `None`), as
    /// diffusers would compute with it; [`Self::tensor_as`] can keep its blocks.
    pub fn tensor(&self, ck: &Checkpoint, name: &str, float_kind: Option<Kind>) -> Result<(Tensor, Option<Source>), CheckpointError> {
        self.tensor_as(ck, name, float_kind, false)
    }

    /// [`Self::tensor`]; with `keep_quantized`, a GGUF-quantized tensor is its blocks (`U8` of its
    /// byte shape), a view of the mapping, for a layer that dequantizes it as it runs.
    pub fn tensor_as(&self, ck: &Checkpoint, name: &str, float_kind: Option<Kind>, keep_quantized: bool) -> Result<(Tensor, Option<Source>), CheckpointError> {
        let loc = ck.tensors.get(name).ok_or_else(|| CheckpointError::tensor(&ck.files[0].0, name, "not in this checkpoint"))?;
        let (t, src) = self.stored(ck, name, loc, float_kind, keep_quantized)?;
        if !loc.swap_halves {
            return Ok((t, src));
        }
        // diffusers' `swap_scale_shift`: (shift, scale) rows become (scale, shift); on a quantized
        // tensor the halves are whole rows of blocks (checked when the file was opened).
        let path = &ck.files[loc.file].0;
        let h = t.size().first().copied().unwrap_or(0) / 2;
        let swapped = Tensor::f_cat(&[t.narrow(0, h, h), t.narrow(0, 0, h)], 0).map_err(|e| CheckpointError::tensor(path, name, e.to_string()))?;
        if let Some(src) = src {
            self.release(src);
        }
        Ok((swapped, None))
    }

    /// A tensor as stored (a view where it can be), before any swap of halves.
    fn stored(&self, ck: &Checkpoint, name: &str, loc: &super::layout::TensorLoc, float_kind: Option<Kind>, keep_quantized: bool) -> Result<(Tensor, Option<Source>), CheckpointError> {
        if let (Some(q), false) = (&loc.quant, keep_quantized) {
            let (path, header) = &ck.files[loc.file];
            let (start, len) = ((header.data_start + loc.info.data_offsets.0) as usize, loc.info.nbytes() as usize);
            let map = &self.0[loc.file];
            let bytes = Tensor::from_slice(&map[start..start + len]);
            let quant = crate::models::quantized::Quant { ggml_type: q.ggml_type, shape: q.shape.iter().map(|&d| d as i64).collect() };
            let out = crate::models::quantized::dequantize(&bytes, &quant, float_kind.unwrap_or(Kind::Float)).map_err(|e| CheckpointError::tensor(path, name, e.to_string()))?;
            release_range(map, start, len);
            return Ok((out, None));
        }
        let (path, header) = &ck.files[loc.file];
        let info = &loc.info;
        let kind = kind_of(info.dtype).ok_or_else(|| CheckpointError::tensor(path, name, format!("dtype {} has no libtorch equivalent", info.dtype)))?;
        let target = match float_kind {
            Some(k) if info.dtype.is_float() => k,
            _ => kind,
        };
        let shape = shape_i64(path, info)?;
        let map = &self.0[loc.file];
        let start = (header.data_start + info.data_offsets.0) as usize;
        let len = info.nbytes() as usize;
        let bytes = &map[start..start + len];
        let err = |e: tch::TchError| CheckpointError::tensor(path, name, e.to_string());
        if (bytes.as_ptr() as usize) % kind.elt_size_in_bytes().max(1) != 0 {
            // Unaligned data (possible in files not written by safetensors): copied, then converted.
            let owned = Tensor::f_from_data_size(bytes, &shape, kind).and_then(|t| t.f_to_kind(target)).map_err(err)?;
            release_range(map, start, len);
            return Ok((owned, None));
        }
        // SAFETY: the range lies in the mapping (validated header), which `self` keeps alive as
        // long as views are used (callers hold it, see [`Mapped`]); the mapping is private, so
        // in-place writes do not reach the file.
        let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], kind, Device::Cpu) }.map_err(err)?;
        if target == kind {
            return Ok((view, Some(Source { file: loc.file, start, len })));
        }
        let out = match convert_fast(info.dtype, target, bytes, &shape) {
            Some(out) => out,
            None => view.f_to_kind(target),
        }
        .map_err(err)?;
        release_range(map, start, len);
        Ok((out, None))
    }

    /// Faults the pages of `src` in ahead of their use (the kernel reads ahead from disk).
    pub fn prefetch(&self, src: Source) {
        let map = &self.0[src.file];
        let _ = map.advise_range(memmap2::Advice::WillNeed, src.start / 4096 * 4096, src.len + src.start % 4096);
        let mut sum = 0u8;
        for i in (src.start..src.start + src.len).step_by(4096) {
            sum = sum.wrapping_add(map[i]);
        }
        std::hint::black_box(sum);
    }

    /// Drops the pages of `src`: its tensor was copied elsewhere and no view of it remains.
    pub fn release(&self, src: Source) {
        release_range(&self.0[src.file], src.start, src.len);
    }

    /// What keeps the mappings alive for the views taken from them.
    pub fn into_mapped(self) -> Mapped {
        Mapped(self.0)
    }
}

/// Loads `names` (all tensors when `None`) of a checkpoint.
pub fn load(ck: &Checkpoint, names: Option<&[&str]>, opts: LoadOptions) -> Result<TensorStore, CheckpointError> {
    let maps = Maps::open(ck, opts.populate)?;
    let mut tensors = BTreeMap::new();
    let mut zero_copy = vec![];
    let wanted: Vec<&str> = match names {
        Some(n) => n.to_vec(),
        None => ck.tensors.keys().map(String::as_str).collect(),
    };
    for name in wanted {
        let (t, view) = maps.tensor(ck, name, opts.float_kind)?;
        let t = match (opts.device, view) {
            (Device::Cpu, Some(_)) => {
                zero_copy.push(name.to_string());
                t
            }
            (Device::Cpu, None) => t,
            (device, view) => {
                let moved = t.f_to_device(device).map_err(|e| CheckpointError::tensor(&ck.files[ck.tensors[name].file].0, name, e.to_string()))?;
                if let Some(v) = view {
                    maps.release(v);
                }
                moved
            }
        };
        tensors.insert(name.to_string(), t);
    }
    Ok(TensorStore { tensors, zero_copy, _maps: maps.0 })
}

/// Drops the pages of a source range that was converted or copied (and so is no longer viewed).
fn release_range(map: &memmap2::MmapMut, start: usize, len: usize) {
    let page = 4096;
    let s = start.div_ceil(page) * page;
    let e = (start + len) / page * page;
    if e > s {
        // SAFETY: no live tensor views this range (its data was converted into a new tensor or
        // copied to a device); a private mapping re-reads the file if it is ever touched again.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, e - s) };
    }
}

/// The expected state of a model: parameter/buffer names and shapes.
pub type Expected = BTreeMap<String, Vec<u64>>;

/// A checkpoint that does not match its model, reported as PyTorch's `load_state_dict` does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_mismatch(self))]
pub struct KeyMismatch {
    pub model: String,
    pub checkpoint: PathBuf,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, checkpoint shape, model shape)
    pub wrong_shape: Vec<(String, Vec<u64>, Vec<u64>)>,
}

fn render_mismatch(m: &KeyMismatch) -> String {
    let mut s = format!("error(s) in loading state_dict for {} from `{}`:", m.model, m.checkpoint.display());
    let list = |v: &[String]| v.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ");
    if !m.missing.is_empty() {
        s.push_str(&format!("\n  missing key(s) in state_dict ({}): {}", m.missing.len(), list(&m.missing)));
    }
    if !m.unexpected.is_empty() {
        s.push_str(&format!("\n  unexpected key(s) in state_dict ({}): {}", m.unexpected.len(), list(&m.unexpected)));
    }
    for (k, have, want) in &m.wrong_shape {
        s.push_str(&format!("\n  size mismatch for {k}: copying a param with shape {have:?} from checkpoint, the shape in current model is {want:?}"));
    }
    s
}

/// Strict check of a checkpoint against a model's expected tensors: every expected key present
/// with its shape, nothing unexpected (diffusers' behaviour; loaders that silently leave weights
/// uninitialised are a known class of bugs).
pub fn check_keys(model: &str, ck: &Checkpoint, expected: &Expected) -> Result<(), KeyMismatch> {
    let missing: Vec<String> = expected.keys().filter(|k| !ck.tensors.contains_key(*k)).cloned().collect();
    let unexpected: Vec<String> = ck.tensors.keys().filter(|k| !expected.contains_key(*k)).cloned().collect();
    let wrong_shape: Vec<(String, Vec<u64>, Vec<u64>)> =
        expected.iter().filter_map(|(k, want)| ck.tensors.get(k).filter(|t| t.shape() != want.as_slice()).map(|t| (k.clone(), t.shape().to_vec(), want.clone()))).collect();
    if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
        return Ok(());
    }
    let source = ck.weights.files.named().to_path_buf();
    Err(KeyMismatch { model: model.to_string(), checkpoint: source, missing, unexpected, wrong_shape })
}
