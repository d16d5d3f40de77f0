//! Integrity lock: `MANIFEST.lock` records the size and sha256 of every file a manifest reads
//! (model_index.json, configs, tokenizer files, every weight shard, the latents file), so that
//! `--locked` can refuse to run on anything else. Hashing runs one file per thread.

use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{open_for_manifest, CheckpointError};
use crate::manifest::LoadedManifest;

pub const LOCK_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}` is not a valid lock file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("`{}` does not exist: create it with `runner lock {}`", path.display(), manifest.display())]
    Missing { path: PathBuf, manifest: PathBuf },
    #[error("{} file(s) differ from `{}`:\n{}", problems.len(), path.display(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Mismatch { path: PathBuf, problems: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    /// Relative to the lock file's folder, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub version: u32,
    /// The manifest this lock belongs to (file name).
    pub manifest: String,
    /// Hub sources and the commits they resolved to (`--locked` runs those commits).
    #[serde(rename = "hub", default, skip_serializing_if = "Vec::is_empty")]
    pub hub: Vec<HubPin>,
    #[serde(rename = "file", default)]
    pub files: Vec<LockEntry>,
}

/// One `hf://` source of the manifest at the commit it resolved to when locked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubPin {
    /// The manifest key (`pipeline.source`).
    pub key: String,
    pub repo: String,
    /// As the manifest writes it (`main` when it names none).
    pub revision: String,
    pub commit: String,
}

/// The pins of `MANIFEST.lock` (none without a lock): what `--locked` resolves Hub names with.
pub fn hub_pins(manifest: &Path) -> Result<crate::hub::Pins, LockError> {
    let path = lock_path(manifest);
    if !path.exists() {
        return Ok(Default::default());
    }
    Ok(read_lock(&path)?.hub.into_iter().map(|p| ((p.repo, p.revision), p.commit)).collect())
}

/// How a lock names a file: a file of a Hub snapshot as `hf://ORG/NAME@COMMIT/PATH` (the same on
/// every machine, wherever its cache is), any other relative to the lock's folder.
fn lock_name(m: &LoadedManifest, dir: &Path, p: &Path) -> String {
    for h in m.hub.values() {
        if let Ok(r) = &h.resolved {
            if let Ok(rel) = p.strip_prefix(&r.snapshot) {
                let rel = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
                return crate::hub::HubName { repo: h.name.repo.clone(), revision: Some(r.commit.clone()), path: (!rel.is_empty()).then_some(rel) }.to_string();
            }
        }
    }
    relative(dir, p)
}

fn pins_of(m: &LoadedManifest) -> Vec<HubPin> {
    m.hub.iter().filter_map(|(k, h)| Some(HubPin { key: k.clone(), repo: h.name.repo.clone(), revision: h.name.revision().to_string(), commit: h.resolved.as_ref().ok()?.commit.clone() })).collect()
}

/// `manifests/sdxl.toml` -> `manifests/sdxl.toml.lock`.
pub fn lock_path(manifest: &Path) -> PathBuf {
    let mut s = manifest.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Every file a run of this manifest reads, sorted.
pub fn manifest_files(m: &LoadedManifest) -> Result<Vec<PathBuf>, LockError> {
    let pipeline = open_for_manifest(m)?;
    let mut files = pipeline.files();
    if let Some(l) = &m.manifest.run.latents {
        files.push(m.resolve_path("run.latents", l));
    }
    for (name, a) in &m.manifest.adapters {
        files.push(m.resolve_path(&format!("adapters.{name}.source"), &a.source));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// sha256 of one file, streamed.
pub fn sha256_file(path: &Path) -> Result<(u64, String), LockError> {
    let io = |source| LockError::Io { path: path.to_path_buf(), source };
    // Non-blocking and checked on the descriptor: a FIFO named like a weight file is refused,
    // never waited on.
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?
    };
    if !f.metadata().map_err(io)?.is_file() {
        return Err(io(std::io::Error::other("not a regular file (a FIFO, device or socket)")));
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, format!("{:x}", h.finalize())))
}

fn relative(from_dir: &Path, p: &Path) -> String {
    // Lexically, from absolute forms of both (symlinks are kept: a lock names what the manifest names).
    let abs = |x: &Path| crate::manifest::normalize(&std::env::current_dir().unwrap_or_default().join(x));
    let from: Vec<_> = abs(from_dir).components().map(|c| c.as_os_str().to_owned()).collect();
    let to: Vec<_> = abs(p).components().map(|c| c.as_os_str().to_owned()).collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); from.len() - common];
    parts.extend(to[common..].iter().map(|c| c.to_string_lossy().into_owned()));
    parts.join("/")
}

/// Hashes `files` in parallel.
pub fn hash_all(files: &[PathBuf]) -> Result<Vec<(u64, String)>, LockError> {
    files.par_iter().map(|p| sha256_file(p)).collect()
}

#[derive(Debug, Serialize)]
pub struct LockReport {
    pub lock: PathBuf,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Writes `MANIFEST.lock` (atomically).
pub fn write_lock(m: &LoadedManifest) -> Result<LockReport, LockError> {
    let t = std::time::Instant::now();
    let files = manifest_files(m)?;
    let hashes = hash_all(&files)?;
    let dir = m.path.parent().unwrap_or(Path::new("")).to_path_buf();
    let entries: Vec<LockEntry> = files.iter().zip(&hashes).map(|(p, (size, sha))| LockEntry { path: lock_name(m, &dir, p), size: *size, sha256: sha.clone() }).collect();
    let lock = LockFile { version: LOCK_VERSION, manifest: m.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), hub: pins_of(m), files: entries };
    let path = lock_path(&m.path);
    let text = format!("# runner lock file: size and sha256 of every file `{}` reads. Regenerate with `runner lock`.\n{}", lock.manifest, toml::to_string(&lock).expect("lock serializes"));
    crate::fsutil::write_file(&path, |w| w.write_all(text.as_bytes())).map_err(|source| LockError::Io { path: path.clone(), source })?;
    let bytes = hashes.iter().map(|(s, _)| s).sum();
    Ok(LockReport { lock: path, files: files.len(), bytes, seconds: t.elapsed().as_secs_f64() })
}

pub fn read_lock(path: &Path) -> Result<LockFile, LockError> {
    let text = std::fs::read_to_string(path).map_err(|source| LockError::Io { path: path.to_path_buf(), source })?;
    let lock: LockFile = toml::from_str(&text).map_err(|e| LockError::Format { path: path.to_path_buf(), msg: e.message().to_string() })?;
    if lock.version != LOCK_VERSION {
        return Err(LockError::Format { path: path.to_path_buf(), msg: format!("version {} is not supported (this runner writes version {LOCK_VERSION})", lock.version) });
    }
    Ok(lock)
}

/// `--locked`: [`verify_lock`], then the lock file's sha256 (what the PNGs record).
pub fn verified_sha256(m: &LoadedManifest) -> Result<String, LockError> {
    verify_lock(m)?;
    Ok(sha256_file(&lock_path(&m.path))?.1)
}

/// Checks every file the manifest reads against `MANIFEST.lock`; names each file that differs.
pub fn verify_lock(m: &LoadedManifest) -> Result<LockReport, LockError> {
    let t = std::time::Instant::now();
    let path = lock_path(&m.path);
    if !path.exists() {
        return Err(LockError::Missing { path, manifest: m.path.clone() });
    }
    let lock = read_lock(&path)?;
    let files = manifest_files(m)?;
    let dir = m.path.parent().unwrap_or(Path::new("")).to_path_buf();
    let wanted: Vec<String> = files.iter().map(|p| lock_name(m, &dir, p)).collect();
    let mut problems = vec![];
    for pin in pins_of(m) {
        if let Some(l) = lock.hub.iter().find(|l| l.key == pin.key && l.repo == pin.repo && l.revision == pin.revision) {
            if l.commit != pin.commit {
                problems
                    .push(format!("`{}` resolves to commit {}, the lock pins {} (run with `--locked`, which reads the pinned commit, after `runner pull --locked`)", pin.key, pin.commit, l.commit));
            }
        }
    }
    for (rel, p) in wanted.iter().zip(&files) {
        if !lock.files.iter().any(|e| &e.path == rel) {
            problems.push(format!("`{}` is read by the manifest but not in the lock (run `runner lock`)", p.display()));
        }
    }
    for e in &lock.files {
        if !wanted.contains(&e.path) {
            problems.push(format!("`{}` is in the lock but the manifest no longer reads it (run `runner lock`)", dir.join(&e.path).display()));
        }
    }
    // Sizes first (cheap), then hashes of the files whose size matches.
    let to_hash: Vec<(PathBuf, &LockEntry)> = lock
        .files
        .iter()
        .filter(|e| wanted.contains(&e.path))
        .filter_map(|e| {
            let p = files.iter().zip(&wanted).find(|(_, w)| *w == &e.path).map(|(p, _)| p.clone()).unwrap_or_else(|| dir.join(&e.path));
            match std::fs::metadata(&p) {
                Err(_) => {
                    problems.push(format!("`{}` is missing", p.display()));
                    None
                }
                Ok(md) if md.len() != e.size => {
                    problems.push(format!("`{}` has {} bytes, the lock says {}", p.display(), md.len(), e.size));
                    None
                }
                Ok(_) => Some((p, e)),
            }
        })
        .collect();
    let results: Vec<Result<(u64, String), LockError>> = to_hash.par_iter().map(|(p, _)| sha256_file(p)).collect();
    let mut bytes = 0;
    for ((p, e), r) in to_hash.iter().zip(results) {
        let (size, sha) = r?;
        bytes += size;
        if sha != e.sha256 {
            problems.push(format!("`{}` has sha256 {sha}, the lock says {}", p.display(), e.sha256));
        }
    }
    if !problems.is_empty() {
        return Err(LockError::Mismatch { path, problems });
    }
    Ok(LockReport { lock: path, files: files.len(), bytes, seconds: t.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(relative(Path::new("manifests"), Path::new("tests/fixtures/a/b.json")), "../tests/fixtures/a/b.json");
        assert_eq!(relative(Path::new(""), Path::new("tests/x")), "tests/x");
        assert_eq!(relative(Path::new("a/b"), Path::new("a/b/c")), "c");
        assert_eq!(lock_path(Path::new("m/sdxl.toml")), PathBuf::from("m/sdxl.toml.lock"));
    }
}
