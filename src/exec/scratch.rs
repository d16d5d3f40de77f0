//! `offload_target = "disk"`'s scratch files: a component's offloaded weights that are not views
//! of its memory-mapped checkpoint (converted to another dtype at load) are written to a file
//! under `placement.scratch_dir` and replaced by views of that file, mapped shared: the page cache
//! serves them, as it serves the checkpoint, and host RAM holds no copy. One file per component
//! and run, created 0600 with its blocks reserved up front, removed when the [`Scratch`] drops
//! (the end of the session, or an error) or, after a `kill -9`, by the next run's check.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{ledger, ExecError};

/// Where scratch files start in the file: aligned for any dtype and for SIMD loads.
const ALIGN: u64 = 64;

/// Checks that `dir` takes files (created when missing), before anything is loaded, and removes
/// the scratch files that killed runs left there (their process is gone, or it is a previous
/// process that had this PID: containers repeat PIDs after a restart).
pub fn check_dir(dir: &Path) -> Result<(), ExecError> {
    let err = |source| ExecError::Io { what: "cannot write into the scratch folder of `offload_target = \"disk\"` (`placement.scratch_dir`)", path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    crate::fsutil::probe_writable(dir).map_err(err)?;
    remove_stale(dir);
    Ok(())
}

/// `runner-scratch-PID-TOKEN-COMPONENT.bin`: the PID finds dead writers, the token (random per
/// process) tells this process's files from those of an earlier one with the same PID.
fn file_name(pid: u32, token: u64, component: &str) -> String {
    format!("runner-scratch-{pid}-{token:016x}-{component}.bin")
}

/// This process's token.
fn token() -> u64 {
    static TOKEN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TOKEN.get_or_init(crate::fsutil::random_token)
}

fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("runner-scratch-")).filter(|n| n.ends_with(".bin")) else { continue };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(tok)) = (parts.next().and_then(|p| p.parse::<u32>().ok()), parts.next().and_then(|t| u64::from_str_radix(t, 16).ok())) else { continue };
        let mine = pid == std::process::id() && tok == token();
        if mine || (pid != std::process::id() && crate::fsutil::alive(pid)) {
            continue;
        }
        // Only regular files of ours: a symlink under the name is removed, never followed.
        if e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()) && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!(path = %e.path().display(), pid, "removed the scratch file of a run that was killed");
        }
    }
}

/// Free bytes for an unprivileged writer in `dir`'s file system.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed out-struct.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
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
        let path = dir.join(file_name(std::process::id(), token(), component));
        let io = |source| ExecError::Io { what: "cannot write the scratch file of `offload_target = \"disk\"`", path: path.clone(), source };
        // Private (0600, whatever the checkpoint's mode), never through a planted symlink.
        let file: File = crate::fsutil::create_private(&path).map_err(io)?;
        let mut s = Scratch { path: path.clone(), map: None, bytes: 0 };
        // Their data, contiguous (an alias when it already is).
        let data: Vec<Tensor> = vars.iter().map(|v| v.contiguous()).collect();
        let mut offsets = Vec::with_capacity(vars.len());
        let mut end = 0u64;
        for v in &data {
            offsets.push(end);
            end = (end + ledger::tensor_bytes(v)).div_ceil(ALIGN) * ALIGN;
        }
        // The blocks are reserved before the mapping is written: a full file system is an error
        // here, not a SIGBUS on the first page that finds no room.
        let len = end.max(1);
        // SAFETY: a file descriptor this function owns.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) } {
            0 => {}
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => {
                let free = free_bytes(dir).map(|b| format!(", {b} free")).unwrap_or_default();
                return Err(ExecError::Unsupported(format!(
                    "no room in the scratch folder {} for `{component}`'s converted weights ({len} bytes needed{free}); free some, or point `placement.scratch_dir` at a file system with room",
                    dir.display()
                )));
            }
            e => return Err(io(std::io::Error::from_raw_os_error(e))),
        }
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Issue 24 item 11: scratch files are private (0600), whatever the umask or the checkpoint's
    /// mode; item 9: the folder's probe follows no symlink planted under the old fixed name.
    #[test]
    fn scratch_files_are_private_and_the_probe_follows_no_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".runner-scratch-test-{}", std::process::id()))).unwrap();
        check_dir(dir.path()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let t = Tensor::from_slice(&[1f32, 2.0, 3.0]);
        let s = Scratch::spill(dir.path(), "vae", vec![t.shallow_clone()]).unwrap();
        let file = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with("runner-scratch-")).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0, 3.0], "the tensor now views the file");
        assert!(s.contains(t.data_ptr() as *const u8));
        drop(t);
        drop(s);
        assert!(!file.exists());
    }
}
