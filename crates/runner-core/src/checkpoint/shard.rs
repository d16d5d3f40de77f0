//! `runner shard`: writes sharded checkpoints that diffusers and transformers load, streaming
//! tensor by tensor from the mapped source (memory stays bounded by one chunk, not the model).
//!
//! Packing follows huggingface_hub's `split_state_dict_into_shards_factory`: tensors in key
//! order, greedily; a tensor larger than the limit gets a shard of its own at once (numbered
//! before the shard still being filled); a tensor that exactly fills the shard still fits. A
//! safetensors file does not keep the state-dict order, so "key order" is sorted tensor names
//! (the order of the index's `weight_map`). Names: one shard is `{stem}[.{variant}].safetensors`
//! with no index; several are `{stem}[.{variant}]-{i:05}-of-{n:05}.safetensors` with
//! `{stem}.safetensors.index[.{variant}].json` (diffusers `save_pretrained` and transformers).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::layout::{resolve_source, Checkpoint, Library, VariantPolicy};
use super::safetensors::{encode_header, Dtype, TensorInfo};
use super::CheckpointError;
use crate::fsutil;
use crate::manifest::Dtype as TargetDtype;

/// Splits tensors `(name, bytes)` (already in key order) into shards of at most `max` bytes,
/// except tensors larger than `max`, which sit alone. Returns indices into `sizes`.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current: Vec<usize> = vec![];
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

pub fn shard_file_name(stem: &str, variant: Option<&str>, i: usize, n: usize) -> String {
    let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
    if n == 1 {
        format!("{stem}{v}.safetensors")
    } else {
        format!("{stem}{v}-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

pub fn index_file_name(stem: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{stem}.safetensors.index.{v}.json"),
        None => format!("{stem}.safetensors.index.json"),
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub max_shard_size: u64,
    pub dtype: Option<TargetDtype>,
    pub variant: Option<String>,
    /// Replace an existing, non-empty output folder.
    pub force: bool,
    /// Flush every shard to disk before the output folder is swapped in, so that a power loss
    /// cannot leave a folder of partly written shards (process interruption never can).
    pub fsync: bool,
}

/// What was written.
#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub out: PathBuf,
    pub files: Vec<(String, u64)>,
    pub index: Option<String>,
    pub tensors: usize,
    pub total_size: u64,
    pub seconds: f64,
}

fn out_dtype(src: Dtype, target: Option<TargetDtype>) -> Dtype {
    match target {
        Some(t) if matches!(src, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16) => match t {
            TargetDtype::Fp32 => Dtype::F32,
            TargetDtype::Fp16 => Dtype::F16,
            TargetDtype::Bf16 => Dtype::BF16,
        },
        _ => src,
    }
}

/// Converts little-endian float data between F64/F32/F16/BF16 with round-to-nearest-even, as
/// torch's `.to(dtype)` does (F64 sources round once, directly to the target).
fn convert(src: Dtype, dst: Dtype, data: &[u8], out: &mut Vec<u8>) {
    use half::{bf16, f16};
    out.clear();
    if src == dst {
        out.extend_from_slice(data);
        return;
    }
    let width = (src.bits() / 8) as usize;
    out.reserve(data.len() / width * (dst.bits() / 8) as usize);
    for chunk in data.chunks_exact(width) {
        let (as_f64, as_f32) = match src {
            Dtype::F64 => (Some(f64::from_le_bytes(chunk.try_into().expect("8 bytes"))), None),
            Dtype::F32 => (None, Some(f32::from_le_bytes(chunk.try_into().expect("4 bytes")))),
            Dtype::F16 => (None, Some(f16::from_le_bytes(chunk.try_into().expect("2 bytes")).to_f32())),
            Dtype::BF16 => (None, Some(bf16::from_le_bytes(chunk.try_into().expect("2 bytes")).to_f32())),
            _ => unreachable!("only float tensors are converted"),
        };
        match (dst, as_f64, as_f32) {
            (Dtype::F32, Some(d), _) => out.extend_from_slice(&(d as f32).to_le_bytes()),
            (Dtype::F16, Some(d), _) => out.extend_from_slice(&f16::from_f64(d).to_le_bytes()),
            (Dtype::BF16, Some(d), _) => out.extend_from_slice(&bf16::from_f64(d).to_le_bytes()),
            (Dtype::F32, None, Some(f)) => out.extend_from_slice(&f.to_le_bytes()),
            (Dtype::F16, None, Some(f)) => out.extend_from_slice(&f16::from_f32(f).to_le_bytes()),
            (Dtype::BF16, None, Some(f)) => out.extend_from_slice(&bf16::from_f32(f).to_le_bytes()),
            _ => unreachable!("float targets only"),
        }
    }
}

/// Reads SRC (a component folder, an index or one file) and writes DIR.
pub fn shard(src: &Path, out: &Path, opts: &ShardOptions, progress: &dyn Fn(u64, u64)) -> Result<ShardReport, CheckpointError> {
    let started = std::time::Instant::now();
    if opts.max_shard_size == 0 {
        return Err(CheckpointError::format(out, "--max-shard-size must be more than 0 bytes"));
    }
    if let Some(v) = &opts.variant {
        if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(CheckpointError::format(out, format!("variant {v:?} must be letters, digits, `_` or `-`")));
        }
    }
    let weights = resolve_source(src, None, None, VariantPolicy::Require)?;
    let library = if src.is_dir() { Library::detect_in(src) } else { src.file_name().and_then(|n| n.to_str()).map(Library::from_file_name) }.unwrap_or(Library::Diffusers);
    let stem = library.weights_stem();
    let checkpoint = Checkpoint::open(weights)?;
    let src_dir = if src.is_dir() { src.to_path_buf() } else { src.parent().unwrap_or(Path::new(".")).to_path_buf() };

    // Refuse to clobber: the source itself, or a non-empty folder without --force.
    // Replacing `out` must never delete the source: refuse an `out` that is, or holds, the source
    // folder or any of its files (after resolving symbolic links and `..`).
    let out_real = fsutil::resolve(out);
    let read: Vec<PathBuf> = std::iter::once(src_dir.clone()).chain(checkpoint.files.iter().map(|(p, _)| p.clone())).collect();
    for p in read {
        let real = fsutil::resolve(&p);
        if real.starts_with(&out_real) {
            let what = if real == out_real { "is the source" } else { "holds the source" };
            return Err(CheckpointError::format(out, format!("{what} (`{}`): replacing it would delete what is being sharded; write the shards to another folder", p.display())));
        }
    }
    if out.exists() {
        if !out.is_dir() {
            return Err(CheckpointError::format(out, "exists and is not a folder"));
        }
        let non_empty = std::fs::read_dir(out).map_err(|e| CheckpointError::io(out, e))?.next().is_some();
        if non_empty && !opts.force {
            return Err(CheckpointError::format(out, "exists and is not empty: pass --force to replace it"));
        }
    }

    // Read with pread, not through a mapping: a source truncated while it is read is then an error
    // naming the file, not a SIGBUS.
    let sources: Vec<File> = checkpoint.files.iter().map(|(p, _)| crate::checkpoint::safetensors::open_regular(p)).collect::<Result<_, _>>()?;
    let names: Vec<&String> = checkpoint.tensors.keys().collect(); // sorted: key order
    let targets: Vec<Dtype> = names.iter().map(|n| out_dtype(checkpoint.tensors[*n].info.dtype, opts.dtype)).collect();
    let sizes: Vec<u64> = names
        .iter()
        .zip(&targets)
        .map(|(n, d)| {
            let info = &checkpoint.tensors[*n].info;
            info.numel() * d.bits() / 8
        })
        .collect();
    let plan = plan_shards(&sizes, opts.max_shard_size);
    let n = plan.len().max(1);
    let total_size: u64 = sizes.iter().sum();

    // Everything goes to a sibling temp folder that replaces `out` in one rename at the end; what
    // killed runs left there goes first.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| CheckpointError::io(parent, e))?;
    fsutil::remove_stale_temps(out);
    let tmp = fsutil::temp_sibling(out, fsutil::TEMP_TAG);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    let guard = TempDir(tmp.clone());

    let mut files = vec![];
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    let (mut buf, mut chunk) = (Vec::new(), Vec::new());
    for (si, members) in plan.iter().enumerate() {
        let name = shard_file_name(stem, opts.variant.as_deref(), si, n);
        // Within a file, safetensors orders tensors by dtype (widest first), then name.
        let mut order: Vec<usize> = members.clone();
        order.sort_by(|&a, &b| targets[b].cmp(&targets[a]).then(names[a].cmp(names[b])));
        let mut infos = vec![];
        let mut off = 0u64;
        for &i in &order {
            let info = &checkpoint.tensors[names[i]].info;
            infos.push(TensorInfo { name: names[i].clone(), dtype: targets[i], shape: info.shape.clone(), data_offsets: (off, off + sizes[i]) });
            off += sizes[i];
            weight_map.insert(names[i].clone(), name.clone());
        }
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let path = tmp.join(&name);
        let file = File::create(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e| CheckpointError::io(&path, e);
        w.write_all(&encode_header(&infos, &metadata)).map_err(io)?;
        for &i in &order {
            let loc = &checkpoint.tensors[names[i]];
            let (src_path, header) = &checkpoint.files[loc.file];
            let (src_dt, dst_dt) = (loc.info.dtype, targets[i]);
            // Copy or convert in chunks so that memory stays bounded even for one huge tensor.
            let elem = (src_dt.bits() / 8).max(1);
            let (start, len) = (header.data_start + loc.info.data_offsets.0, loc.info.nbytes());
            let mut at = 0u64;
            while at < len {
                let n = ((1u64 << 22) * elem).min(len - at) as usize;
                chunk.resize(n, 0);
                sources[loc.file].read_exact_at(&mut chunk, start + at).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        CheckpointError::format(src_path, format!("the file ended inside tensor `{}`: it was truncated or replaced while runner read it", names[i]))
                    } else {
                        CheckpointError::io(src_path, e)
                    }
                })?;
                if src_dt == dst_dt {
                    w.write_all(&chunk).map_err(io)?;
                } else {
                    convert(src_dt, dst_dt, &chunk, &mut buf);
                    w.write_all(&buf).map_err(io)?;
                }
                at += n as u64;
            }
            done += sizes[i];
            progress(done, total_size);
        }
        let file = w.into_inner().map_err(|e| CheckpointError::io(&path, e.into_error()))?;
        if opts.fsync {
            file.sync_all().map_err(io)?;
        }
        files.push((name, off));
    }
    if plan.is_empty() {
        // An empty state dict still makes a (tensor-less) loadable file, as save_pretrained does.
        let name = shard_file_name(stem, opts.variant.as_deref(), 0, 1);
        let path = tmp.join(&name);
        std::fs::write(&path, encode_header(&[], &BTreeMap::from([("format".to_string(), "pt".to_string())]))).map_err(|e| CheckpointError::io(&path, e))?;
        files.push((name, 0));
    }
    let index = if n > 1 {
        let name = index_file_name(stem, opts.variant.as_deref());
        let json = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&json).expect("index serializes") + "\n";
        let path = tmp.join(&name);
        std::fs::write(&path, text).map_err(|e| CheckpointError::io(&path, e))?;
        Some(name)
    } else {
        None
    };
    let config = src_dir.join("config.json");
    if config.is_file() {
        std::fs::copy(&config, tmp.join("config.json")).map_err(|e| CheckpointError::io(&config, e))?;
    }

    // Swap in: `out` is never a half-written checkpoint, and never something another writer put
    // there meanwhile (the rename does not replace: the check is made again, atomically).
    let taken = || CheckpointError::format(out, "was written by someone else while sharding: pass --force to replace it");
    let mut old = None;
    if std::fs::symlink_metadata(out).is_ok() {
        if opts.force {
            let o = fsutil::temp_sibling(out, fsutil::OLD_TAG);
            std::fs::rename(out, &o).map_err(|e| CheckpointError::io(out, e))?;
            old = Some(o);
        } else if std::fs::remove_dir(out).is_err() {
            // It was empty when checked: someone filled it since.
            return Err(taken());
        }
    }
    fsutil::rename_no_replace(&tmp, out).map_err(|e| if e.kind() == std::io::ErrorKind::AlreadyExists { taken() } else { CheckpointError::io(out, e) })?;
    if let Some(o) = old {
        let _ = std::fs::remove_dir_all(o);
    }
    std::mem::forget(guard);
    let files: Vec<(String, u64)> = files
        .into_iter()
        .map(|(name, data)| {
            let size = std::fs::metadata(out.join(&name)).map(|m| m.len()).unwrap_or(data);
            (name, size)
        })
        .collect();
    Ok(ShardReport { out: out.to_path_buf(), files, index, tensors: names.len(), total_size, seconds: started.elapsed().as_secs_f64() })
}

/// Removes a temp folder unless the write completed.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_packing_example() {
        // Verified against huggingface_hub: a=1, b=12, c=1, d=9, e=11, f=1 (GB), max 10.
        assert_eq!(plan_shards(&[1, 12, 1, 9, 11, 1], 10), vec![vec![1], vec![0, 2], vec![4], vec![3, 5]]);
        assert_eq!(plan_shards(&[5, 5, 5], 10), vec![vec![0, 1], vec![2]], "exactly full still fits");
        assert_eq!(plan_shards(&[], 10), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn names() {
        assert_eq!(shard_file_name("diffusion_pytorch_model", None, 0, 1), "diffusion_pytorch_model.safetensors");
        assert_eq!(shard_file_name("diffusion_pytorch_model", Some("fp16"), 1, 3), "diffusion_pytorch_model.fp16-00002-of-00003.safetensors");
        assert_eq!(shard_file_name("model", None, 0, 2), "model-00001-of-00002.safetensors");
        assert_eq!(index_file_name("diffusion_pytorch_model", Some("fp16")), "diffusion_pytorch_model.safetensors.index.fp16.json");
    }

    #[test]
    fn conversion_rounds_to_nearest_even() {
        let mut out = vec![];
        let src: Vec<u8> = [1.0f32, 65504.0, 1e-8, 0.1, -2.5, f32::INFINITY].iter().flat_map(|f| f.to_le_bytes()).collect();
        convert(Dtype::F32, Dtype::F16, &src, &mut out);
        let back: Vec<f32> = out.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        assert_eq!(back, [1.0, 65504.0, 0.0, 0.099975586, -2.5, f32::INFINITY]);
        convert(Dtype::F32, Dtype::BF16, &src, &mut out);
        let back: Vec<f32> = out.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        assert_eq!(back[3].to_bits(), 0x3DCD_0000); // torch.tensor(0.1).bfloat16() == 0.10009765625
    }

    proptest::proptest! {
        // Every tensor is in exactly one shard, in key order; no shard but a lone oversized
        // tensor exceeds the limit; each shard boundary was forced (the next tensor did not fit).
        #[test]
        fn packing_invariants(sizes in proptest::collection::vec(0u64..40, 0..30), max in 1u64..50) {
            let plan = plan_shards(&sizes, max);
            let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
            seen.sort();
            proptest::prop_assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
            for s in &plan {
                let total: u64 = s.iter().map(|&i| sizes[i]).sum();
                proptest::prop_assert!(total <= max || s.len() == 1);
                proptest::prop_assert!(s.windows(2).all(|w| w[0] < w[1]));
            }
            let normal: Vec<&Vec<usize>> = plan.iter().filter(|s| !(s.len() == 1 && sizes[s[0]] > max)).collect();
            for w in normal.windows(2) {
                let total: u64 = w[0].iter().map(|&i| sizes[i]).sum();
                proptest::prop_assert!(total + sizes[w[1][0]] > max);
            }
        }
    }
}
