//! `offload_target = "disk"`'s scratch files: a component's offloaded weights that are not views
//! of its memory-mapped checkpoint (converted to another dtype at load) are written to a file
//! under `placement.scratch_dir` and replaced by views of that file, mapped shared: the page cache
//! serves them, as it serves the checkpoint, and host RAM holds no copy. One file per component
//! and run, removed when the [`Scratch`] drops (the end of the session, or an error).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{ledger, ExecError};

/// Where scratch files start in the file: aligned for any dtype and for SIMD loads.
const ALIGN: u64 = 64;

/// Checks that `dir` takes files (created when missing), before anything is loaded.
pub fn check_dir(dir: &Path) -> Result<(), ExecError> {
    let err = |source| ExecError::Io { what: "cannot write into the scratch folder of `offload_target = \"disk\"` (`placement.scratch_dir`)", path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".runner-scratch-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(err)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// A component's scratch file and its mapping; the file goes when this drops.
pub struct Scratch {
    path: PathBuf,
    // Unmapped before the file is removed.
    map: Option<memmap2::MmapMut>,
    bytes: u64,
}

impl Scratch {
    /// Moves the data of `vars` (host tensors) into a new scratch file under `dir` and points each
    /// variable at its view of the file. Nothing is changed on an error (the file is removed).
    pub fn spill(dir: &Path, component: &str, vars: Vec<Tensor>) -> Result<Scratch, ExecError> {
        let path = dir.join(format!("runner-scratch-{}-{component}.bin", std::process::id()));
        let io = |source| ExecError::Io { what: "cannot write the scratch file of `offload_target = \"disk\"`", path: path.clone(), source };
        let file: File = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io)?;
        let mut s = Scratch { path: path.clone(), map: None, bytes: 0 };
        // Their data, contiguous (an alias when it already is).
        let data: Vec<Tensor> = vars.iter().map(|v| v.contiguous()).collect();
        let mut offsets = Vec::with_capacity(vars.len());
        let mut end = 0u64;
        for v in &data {
            offsets.push(end);
            end = (end + ledger::tensor_bytes(v)).div_ceil(ALIGN) * ALIGN;
        }
        file.set_len(end.max(1)).map_err(io)?;
        // SAFETY: a file this process just created (`create_new`) and removes on drop; nothing
        // else maps or truncates it.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(io)?;
        for (v, &off) in data.iter().zip(&offsets) {
            let n = ledger::tensor_bytes(v) as usize;
            // SAFETY: `v` is a contiguous CPU tensor of `n` bytes.
            let src = unsafe { std::slice::from_raw_parts(v.data_ptr() as *const u8, n) };
            map[off as usize..off as usize + n].copy_from_slice(src);
        }
        map.flush().map_err(io)?;
        let mut views = Vec::with_capacity(vars.len());
        for (v, &off) in data.iter().zip(&offsets) {
            // SAFETY: the range lies in the mapping, which lives as long as `self` (the session
            // drops its models first).
            let view = unsafe { Tensor::f_from_blob(map.as_ptr().add(off as usize), &v.size(), &[], v.kind(), tch::Device::Cpu) }
                .map_err(|e| ExecError::Unsupported(format!("cannot view the scratch file {}: {e}", path.display())))?;
            views.push(view);
        }
        drop(data);
        tch::no_grad(|| {
            for (mut v, view) in vars.into_iter().zip(views) {
                v.set_data(&view);
            }
        });
        // The written pages are on disk now: out of this process's resident set (the page cache
        // keeps them while there is room).
        // SAFETY: a shared file mapping: `DONTNEED` drops the page-table entries only, the data
        // stays in the file.
        let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        s.bytes = end;
        s.map = Some(map);
        tracing::info!(component, bytes = end, path = %path.display(), "offload: converted weights in a scratch file");
        Ok(s)
    }

    /// Whether `p` points into this scratch file's mapping.
    pub fn contains(&self, p: *const u8) -> bool {
        self.map.as_ref().is_some_and(|m| {
            let (p, start) = (p as usize, m.as_ptr() as usize);
            p >= start && p < start + m.len()
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.map.take();
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove the scratch file: {e}");
        }
    }
}
