//! `runner quantize`: a FLUX.1 or SD3/SD3.5 transformer stored as safetensors (a component
//! folder, an index or one file) to one GGUF file that diffusers' `from_single_file`, the Python
//! `gguf` reader and runner load, with city96's rules for what stays unquantized
//! (ComfyUI-GGUF `tools/convert.py` and its `llama-quantize` patch):
//! - 1-D tensors and tensors of at most 1024 elements: F32;
//! - the embedders and the final layer (FLUX `img_in`, `txt_in`, `time_in`, `vector_in`,
//!   `guidance_in`, `final_layer`; SD3 `x_embedder`, `pos_embed`, `t_embedder`, `y_embedder`,
//!   `context_embedder`, `final_layer`, and their diffusers names): the base type, BF16 for a
//!   bf16 source, else F16;
//! - rows that are not whole blocks of the type: the base type, as llama-quantize falls back;
//! - everything else: the type asked for, quantized as `gguf.quants.quantize` does;
//! - but never a BF16 tensor of more than 2 dimensions (SD3's patch-embedding convolution): diffusers
//!   runs only Linear weights from GGUF types, so it is written F32.
//!
//! Tensors stream one block-aligned chunk at a time from the source (read, not mapped: a source
//! truncated meanwhile is an error naming it), so memory stays bounded by a chunk; the file is
//! written to a temp file and renamed into place, never over its source.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::convert;
use super::ggml::{self, QUANTIZE_TYPES};
use super::gguf::{self, Family, GgmlType, KeyStyle, WriteTensor, WriteValue};
use super::layout::{resolve_source, Checkpoint, VariantPolicy};
use super::safetensors::Dtype;
use super::CheckpointError;
use crate::fsutil;

/// city96's `QUANTIZATION_THRESHOLD`: smaller tensors stay F32.
pub const SMALL: u64 = 1024;

/// Elements converted at a time, and quantized per thread (multiples of every block size).
const CHUNK: u64 = 1 << 22;
const PIECE: u64 = 1 << 16;

pub struct QuantizeOptions {
    pub ggml_type: GgmlType,
    /// The names written: diffusers' or the original checkpoint's; None: as the source has them.
    pub keys: Option<KeyStyle>,
    /// Replace an existing output file.
    pub force: bool,
}

#[derive(Debug, Serialize)]
pub struct QuantizeReport {
    pub out: PathBuf,
    pub family: Family,
    /// The names written.
    pub key_style: KeyStyle,
    #[serde(rename = "type")]
    pub ggml_type: GgmlType,
    pub tensors: usize,
    /// Per type written: tensors, parameters, bytes.
    pub types: Vec<gguf::TypeCount>,
    pub source_bytes: u64,
    pub file_bytes: u64,
    pub seconds: f64,
}

/// The modules city96's tools keep unquantized, by the names a key may have (original or diffusers').
fn keep_base(family: Family, name: &str) -> bool {
    let name = gguf::strip_prefix(name);
    let prefixes: &[&str] = match family {
        Family::Flux => &[
            "img_in.",
            "txt_in.",
            "time_in.",
            "vector_in.",
            "guidance_in.",
            "final_layer.",
            // diffusers: x_embedder (img_in), context_embedder (txt_in), time_text_embed (time_in,
            // vector_in, guidance_in), norm_out / proj_out (final_layer; a block's own proj_out is not)
            "x_embedder.",
            "context_embedder.",
            "time_text_embed.",
            "norm_out.",
            "proj_out.",
        ],
        Family::Sd3 => &["final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder.", "proj_out.", "pos_embed", "norm_out."],
    };
    prefixes.iter().any(|p| name.starts_with(p))
}

/// `general.file_type` (llama.cpp's `LlamaFileType`) of a file mostly of `t`.
fn file_type(t: GgmlType) -> u32 {
    match t.name() {
        "F32" => 0,
        "F16" => 1,
        "Q4_0" => 2,
        "Q4_1" => 3,
        "Q8_0" => 7,
        "Q5_0" => 8,
        "Q5_1" => 9,
        _ => 32, // BF16
    }
}

/// The type each tensor is written as (see the module's rules): `want` where city96's tools
/// quantize, else F32 or the source's half type.
pub fn target(family: Family, name: &str, shape: &[u64], src: Dtype, want: GgmlType) -> GgmlType {
    let base = if want.quantized() {
        if src == Dtype::BF16 {
            GgmlType::BF16
        } else {
            GgmlType::F16
        }
    } else {
        want
    };
    let numel: u64 = shape.iter().product();
    let t = if shape.len() <= 1 || numel <= SMALL {
        GgmlType::F32
    } else if keep_base(family, name) || shape.last().is_some_and(|&row| row % want.block_size() != 0) {
        base
    } else {
        want
    };
    // diffusers runs only Linear weights from GGUF types (BF16 counts as one): a BF16
    // convolution weight (SD3's patch embedding) could not run there, so it stays F32.
    if t == GgmlType::BF16 && shape.len() > 2 {
        GgmlType::F32
    } else {
        t
    }
}

/// Writes `out` (a .gguf file) from the transformer at `src`, every tensor as [`target`] says.
pub fn quantize(src: &Path, out: &Path, opts: &QuantizeOptions, progress: &dyn Fn(u64, u64)) -> Result<QuantizeReport, CheckpointError> {
    let started = std::time::Instant::now();
    let want = opts.ggml_type;
    if !QUANTIZE_TYPES.contains(&want) || want == GgmlType::F32 {
        return Err(CheckpointError::format(out, format!("cannot write {want}; runner writes q8_0, q4_0, q4_1, q5_0, q5_1, bf16, f16")));
    }
    if out.extension().is_none_or(|e| e != "gguf") {
        return Err(CheckpointError::format(out, "the output must be a .gguf file"));
    }
    let weights = resolve_source(src, None, None, VariantPolicy::Require)?;
    let checkpoint = Checkpoint::open(weights)?;
    let names: Vec<&String> = checkpoint.tensors.keys().collect();
    let (family, key_style) = gguf::detect(&names.iter().map(|n| n.as_str()).collect::<Vec<_>>()).ok_or_else(|| {
        CheckpointError::format(src, "not a FLUX.1 or SD3/SD3.5 transformer by its tensor names: runner quantizes those (city96's tools advise against quantizing the convolution-heavy UNets)")
    })?;

    // Never over the source; an existing output only with --force.
    let out_real = fsutil::resolve(out);
    for (p, _) in &checkpoint.files {
        if fsutil::resolve(p) == out_real {
            return Err(CheckpointError::format(out, format!("is the source (`{}`): write the GGUF file elsewhere", p.display())));
        }
    }
    if std::fs::symlink_metadata(out).is_ok() && !opts.force {
        return Err(CheckpointError::format(out, "exists: pass --force to replace it"));
    }
    fsutil::check_destination(out).map_err(|e| CheckpointError::format(out, e))?;

    // What each output tensor is made of, and what it becomes, checked before anything is written.
    let style = opts.keys.unwrap_or(key_style);
    let outs = layout(&checkpoint, family, key_style, style).map_err(|e| CheckpointError::format(src, e))?;
    let mut plan = vec![];
    for o in &outs {
        let (file, _) = &checkpoint.files[checkpoint.tensors[&o.parts[0].0].file];
        if !matches!(o.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return Err(CheckpointError::tensor(file, &o.parts[0].0, format!("is {:?}: only floating-point tensors are quantized", o.dtype)));
        }
        if o.shape.len() > gguf::MAX_DIMS {
            return Err(CheckpointError::tensor(file, &o.parts[0].0, format!("has {} dimensions: GGUF holds at most {}", o.shape.len(), gguf::MAX_DIMS)));
        }
        let t = target(family, &o.name, &o.shape, o.dtype, want);
        let numel: u64 = o.shape.iter().product();
        plan.push((t, numel / t.block_size() * t.type_size()));
    }
    let tensors: Vec<WriteTensor> = outs.iter().zip(&plan).map(|(o, (t, bytes))| WriteTensor { name: &o.name, shape: &o.shape, ggml_type: *t, n_bytes: *bytes }).collect();
    let metadata = [("general.architecture", WriteValue::Str(family.as_str().into())), ("general.quantization_version", WriteValue::U32(2)), ("general.file_type", WriteValue::U32(file_type(want)))];
    let (header, offsets) = gguf::encode_header(&metadata, &tensors, gguf::DEFAULT_ALIGNMENT).map_err(|e| CheckpointError::format(out, e))?;
    let total: u64 = plan.iter().map(|p| p.1).sum();
    let source_bytes: u64 = checkpoint.tensors.values().map(|t| t.info.nbytes()).sum();

    let sources: Vec<std::fs::File> = checkpoint.files.iter().map(|(p, _)| super::safetensors::open_regular(p)).collect::<Result<_, _>>()?;
    let mut failed: Option<CheckpointError> = None;
    let written = fsutil::write_file(out, |w| {
        w.write_all(&header)?;
        let (mut raw, mut values) = (Vec::new(), Vec::new());
        let mut at = 0u64; // bytes of data written
        let mut done = 0u64;
        for (i, o) in outs.iter().enumerate() {
            let pad = offsets[i] - at;
            w.write_all(&vec![0u8; pad as usize])?;
            at += pad;
            let (t, size) = plan[i];
            for (name, first, count) in o.segments() {
                let loc = &checkpoint.tensors[name];
                let (src_path, file_header) = &checkpoint.files[loc.file];
                let elem = loc.info.dtype.bits() / 8;
                let row = row_elems(&loc.info.shape);
                let start = file_header.data_start + loc.info.data_offsets.0 + first * row * elem;
                let numel = count * row;
                let mut e = 0u64;
                while e < numel {
                    let n = CHUNK.min(numel - e);
                    raw.resize((n * elem) as usize, 0);
                    if let Err(err) = sources[loc.file].read_exact_at(&mut raw, start + e * elem) {
                        failed = Some(if err.kind() == std::io::ErrorKind::UnexpectedEof {
                            CheckpointError::format(src_path, format!("the file ended inside tensor `{name}`: it was truncated or replaced while runner read it"))
                        } else {
                            CheckpointError::io(src_path, err)
                        });
                        return Err(std::io::Error::other("source"));
                    }
                    values.clear();
                    to_f32(loc.info.dtype, &raw, &mut values);
                    // Blocks are independent: pieces of a chunk quantize in parallel, written in order.
                    let pieces: Vec<Result<Vec<u8>, String>> = values
                        .par_chunks(PIECE as usize)
                        .map(|v| {
                            let mut b = Vec::new();
                            ggml::quantize(t, v, &mut b).map(|_| b)
                        })
                        .collect();
                    for p in pieces {
                        w.write_all(&p.map_err(std::io::Error::other)?)?;
                    }
                    e += n;
                }
            }
            at += size;
            done += size;
            progress(done, total);
        }
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    written.map_err(|e| CheckpointError::io(out, e))?;

    let mut types: BTreeMap<GgmlType, gguf::TypeCount> = BTreeMap::new();
    for (o, (t, bytes)) in outs.iter().zip(&plan) {
        let c = types.entry(*t).or_insert(gguf::TypeCount { ggml_type: *t, tensors: 0, parameters: 0, bytes: 0 });
        c.tensors += 1;
        c.parameters += o.shape.iter().product::<u64>();
        c.bytes += bytes;
    }
    let file_bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(QuantizeReport {
        out: out.to_path_buf(),
        family,
        key_style: style,
        ggml_type: want,
        tensors: outs.len(),
        types: types.into_values().collect(),
        source_bytes,
        file_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One tensor of the output: its name and shape, the source's dtype, and the rows of source
/// tensors it concatenates (name, first row, rows); `swap`: the two halves of its rows exchanged
/// (diffusers' `swap_scale_shift`, one way or the other).
struct OutTensor {
    name: String,
    shape: Vec<u64>,
    dtype: Dtype,
    parts: Vec<(String, u64, u64)>,
    swap: bool,
}

impl OutTensor {
    /// The source rows in the order they are written.
    fn segments(&self) -> Vec<(&str, u64, u64)> {
        match (self.swap, self.parts.as_slice()) {
            (true, [(n, first, count)]) => vec![(n.as_str(), first + count / 2, count / 2), (n.as_str(), *first, count / 2)],
            _ => self.parts.iter().map(|(n, f, c)| (n.as_str(), *f, *c)).collect(),
        }
    }
}

/// Elements in one row (first dimension) of a tensor of `shape`.
fn row_elems(shape: &[u64]) -> u64 {
    shape.iter().skip(1).product()
}

/// The output tensors, in the names `to` asks for, from a source named `from`'s way.
fn layout(ck: &Checkpoint, family: Family, from: KeyStyle, to: KeyStyle) -> Result<Vec<OutTensor>, String> {
    let info = |n: &str| &ck.tensors[n].info;
    let rows = |n: &str| info(n).shape.first().copied().unwrap_or(1);
    match (from, to) {
        // Kept, but for city96's stripping of the `model.diffusion_model.` prefix.
        (KeyStyle::Diffusers, KeyStyle::Diffusers) | (KeyStyle::Original, KeyStyle::Original) => Ok(ck
            .tensors
            .iter()
            .map(|(n, t)| OutTensor { name: gguf::strip_prefix(n).to_string(), shape: t.info.shape.clone(), dtype: t.info.dtype, parts: vec![(n.clone(), 0, rows(n))], swap: false })
            .collect()),
        (KeyStyle::Original, KeyStyle::Diffusers) => {
            let shapes: BTreeMap<String, Vec<u64>> = ck.tensors.iter().map(|(n, t)| (n.clone(), t.info.shape.clone())).collect();
            let plan = convert::to_diffusers(family, &shapes)?;
            Ok(plan
                .into_iter()
                .map(|(name, p)| {
                    let (first, count) = p.rows.unwrap_or((0, rows(&p.source)));
                    let mut shape = info(&p.source).shape.clone();
                    if let Some(r) = shape.first_mut() {
                        *r = count;
                    }
                    OutTensor { name, shape, dtype: info(&p.source).dtype, parts: vec![(p.source, first, count)], swap: p.swap_halves }
                })
                .collect())
        }
        (KeyStyle::Diffusers, KeyStyle::Original) => {
            let names: Vec<&str> = ck.tensors.keys().map(String::as_str).collect();
            convert::from_diffusers(family, &names)?
                .into_iter()
                .map(|(name, parts, swap)| {
                    let first = info(&parts[0]);
                    let tail = |s: &[u64]| s.get(1..).unwrap_or(&[]).to_vec();
                    for p in &parts[1..] {
                        if tail(&info(p).shape) != tail(&first.shape) || info(p).dtype != first.dtype {
                            return Err(format!("`{p}` ({:?}, {:?}) cannot be joined with `{}` ({:?}, {:?}) into `{name}`", info(p).dtype, info(p).shape, parts[0], first.dtype, first.shape));
                        }
                    }
                    let mut shape = first.shape.clone();
                    if let Some(r) = shape.first_mut() {
                        *r = parts.iter().map(|p| rows(p)).sum();
                    }
                    let total_rows = shape.first().copied().unwrap_or(0);
                    if swap && (shape.is_empty() || total_rows % 2 != 0) {
                        return Err(format!("`{}` has shape {shape:?}: not two equal scale, shift halves of rows", parts[0]));
                    }
                    let dtype = first.dtype;
                    Ok(OutTensor { name, shape, dtype, parts: parts.iter().map(|p| (p.clone(), 0, rows(p))).collect(), swap })
                })
                .collect()
        }
    }
}

/// Little-endian float data to f32 (F64 rounded to nearest).
fn to_f32(src: Dtype, data: &[u8], out: &mut Vec<f32>) {
    use half::{bf16, f16};
    match src {
        Dtype::F32 => out.extend(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        Dtype::F16 => out.extend(data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        Dtype::BF16 => out.extend(data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        Dtype::F64 => out.extend(data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)),
        _ => unreachable!("float tensors only (checked before writing)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn city96_rules() {
        let q = GgmlType::Q4_0;
        assert_eq!(target(Family::Flux, "transformer_blocks.0.attn.to_q.weight", &[3072, 3072], Dtype::BF16, q), q);
        assert_eq!(target(Family::Flux, "transformer_blocks.0.attn.to_q.bias", &[3072], Dtype::BF16, q), GgmlType::F32);
        assert_eq!(target(Family::Flux, "transformer_blocks.0.attn.norm_q.weight", &[128], Dtype::BF16, q), GgmlType::F32);
        assert_eq!(target(Family::Flux, "small", &[32, 32], Dtype::F32, q), GgmlType::F32);
        assert_eq!(target(Family::Flux, "x_embedder.weight", &[3072, 64], Dtype::BF16, q), GgmlType::BF16);
        assert_eq!(target(Family::Flux, "img_in.weight", &[3072, 64], Dtype::F32, q), GgmlType::F16);
        assert_eq!(target(Family::Flux, "model.diffusion_model.final_layer.linear.weight", &[64, 3072], Dtype::F16, q), GgmlType::F16);
        assert_eq!(target(Family::Flux, "proj_out.weight", &[64, 3072], Dtype::F16, q), GgmlType::F16);
        // A block's own proj_out is quantized.
        assert_eq!(target(Family::Flux, "single_transformer_blocks.0.proj_out.weight", &[3072, 15360], Dtype::F16, q), q);
        assert_eq!(target(Family::Sd3, "pos_embed.proj.weight", &[1536, 16, 2, 2], Dtype::F16, q), GgmlType::F16);
        assert_eq!(target(Family::Sd3, "pos_embed.proj.weight", &[1536, 16, 2, 2], Dtype::BF16, q), GgmlType::F32, "no BF16 convolution");
        assert_eq!(target(Family::Sd3, "pos_embed.proj.weight", &[1536, 16, 2, 2], Dtype::F32, GgmlType::BF16), GgmlType::F32);
        assert_eq!(target(Family::Sd3, "joint_blocks.0.x_block.attn.qkv.weight", &[4608, 1536], Dtype::F16, q), q);
        // Rows not whole blocks: the base type.
        assert_eq!(target(Family::Sd3, "transformer_blocks.0.ff.net.0.proj.weight", &[64, 48], Dtype::F32, q), GgmlType::F16);
        // bf16 / f16 asked: every large tensor that type, the small ones F32.
        assert_eq!(target(Family::Flux, "x_embedder.weight", &[3072, 64], Dtype::F32, GgmlType::BF16), GgmlType::BF16);
        assert_eq!(target(Family::Flux, "x.bias", &[3072], Dtype::F32, GgmlType::F16), GgmlType::F32);
    }
}
