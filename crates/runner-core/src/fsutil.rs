//! Writing outputs without damaging anything: temp file (or folder) beside the target, fsync,
//! rename. Temp names always fit a file system's 255-byte name limit and carry the writer's PID,
//! so that the next writer can remove the leftovers of a killed one (and only those). Existing
//! character devices and FIFOs (`/dev/null`, `/dev/stdout`, a named pipe) are written in place,
//! never replaced; other non-regular targets are refused.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// The longest file name most file systems take (ext4, xfs, btrfs, tmpfs: 255 bytes).
const NAME_MAX: usize = 255;

/// What a temp name says after the target's name: `.runner-tmp-PID`, `.runner-old-PID`.
pub const TEMP_TAG: &str = "runner-tmp";
pub const OLD_TAG: &str = "runner-old";

/// `.{name}.{tag}-{pid}` beside `target`, the name shortened (at a character boundary) so that the
/// whole fits in 255 bytes.
pub fn temp_sibling(target: &Path, tag: &str) -> PathBuf {
    temp_sibling_for(target, tag, std::process::id())
}

fn temp_prefix(target: &Path, tag: &str) -> Vec<u8> {
    let name = target.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_else(|| b"out".to_vec());
    // "." + name + "." + tag + "-" + up to 10 digits of PID
    let room = NAME_MAX - (1 + 1 + tag.len() + 1 + 10);
    let mut cut = name.len().min(room);
    while cut > 0 && cut < name.len() && (name[cut] & 0xC0) == 0x80 {
        cut -= 1; // keep UTF-8 sequences whole
    }
    let mut out = b".".to_vec();
    out.extend_from_slice(&name[..cut]);
    out.push(b'.');
    out.extend_from_slice(tag.as_bytes());
    out.push(b'-');
    out
}

fn temp_sibling_for(target: &Path, tag: &str, pid: u32) -> PathBuf {
    let mut name = temp_prefix(target, tag);
    name.extend_from_slice(pid.to_string().as_bytes());
    let dir = parent_of(target);
    dir.join(OsString::from_vec(name))
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A random 64-bit value (std's per-process hasher keys come from the OS's randomness): names
/// that another user cannot plant a symlink under in advance.
pub fn random_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// Creates a new file at `path` for this process alone: `O_CREAT | O_EXCL | O_NOFOLLOW`, mode
/// 0600. Never follows a symlink planted there nor truncates an existing file (`EEXIST`).
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Checks that `dir` takes new files: creates and removes a probe of an unpredictable name with
/// [`create_private`], so a symlink planted in a shared folder can neither redirect nor truncate
/// anything.
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".runner-probe-{}-{:016x}", std::process::id(), random_token()));
    create_private(&probe)?;
    std::fs::remove_file(&probe)
}

/// Whether process `pid` exists (a PID of another user's process counts as alive).
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks for the process.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes what killed writers of `target` left beside it: `.{name}.runner-tmp-PID` and
/// `.{name}.runner-old-PID` (files or folders) whose PID no longer runs. Returns what it removed.
pub fn remove_stale_temps(target: &Path) -> Vec<PathBuf> {
    remove_stale_temps_of(&[target.to_path_buf()])
}

/// [`remove_stale_temps`] for many targets, reading each folder once (a batch's outputs).
pub fn remove_stale_temps_of(targets: &[PathBuf]) -> Vec<PathBuf> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut by_dir: BTreeMap<&Path, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for t in targets {
        let set = by_dir.entry(parent_of(t)).or_default();
        set.insert(temp_prefix(t, TEMP_TAG));
        set.insert(temp_prefix(t, OLD_TAG));
    }
    let mut removed = vec![];
    for (dir, prefixes) in by_dir {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let bytes = name.as_bytes();
            let digits = bytes.iter().rev().take_while(|b| b.is_ascii_digit()).count();
            let (prefix, pid) = bytes.split_at(bytes.len() - digits);
            let Some(pid) = std::str::from_utf8(pid).ok().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if !prefixes.contains(prefix) || pid == std::process::id() || alive(pid) {
                continue;
            }
            let path = e.path();
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if gone.is_ok() {
                tracing::info!(path = %path.display(), pid, "removed the leftover of a killed writer");
                removed.push(path);
            }
        }
    }
    removed
}

/// How an output is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A regular file (existing or not): written to a temp file beside it, then renamed over it.
    /// The path is the symlink-resolved one, so that a link is followed, not replaced.
    Replace(PathBuf),
    /// An existing character device or FIFO: written in place.
    InPlace(PathBuf),
}

/// Checks that `path` can take an output, before any work is done: not a folder, not a block
/// device or socket, its folder existing (or creatable) and writable.
pub fn check_destination(path: &Path) -> Result<Destination, String> {
    if path.as_os_str().is_empty() {
        return Err("the output path is empty".into());
    }
    match std::fs::metadata(path) {
        Ok(meta) => {
            let t = meta.file_type();
            if t.is_dir() {
                return Err("is a folder, not a file".into());
            }
            if t.is_char_device() || t.is_fifo() {
                return Ok(Destination::InPlace(path.to_path_buf()));
            }
            if !t.is_file() {
                return Err("exists and is neither a regular file, a character device nor a FIFO: refusing to replace it".into());
            }
            let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            writable_dir(parent_of(&real))?;
            Ok(Destination::Replace(real))
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err("is a dangling symbolic link".into());
            }
            // The nearest existing ancestor must be a writable folder (the rest is created).
            let mut dir = parent_of(path).to_path_buf();
            loop {
                match std::fs::metadata(&dir) {
                    Ok(m) if m.is_dir() => break,
                    Ok(_) => return Err(format!("`{}` is not a folder", dir.display())),
                    Err(_) => match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                        Some(p) => dir = p.to_path_buf(),
                        None => {
                            dir = PathBuf::from(".");
                            break;
                        }
                    },
                }
            }
            writable_dir(&dir)?;
            Ok(Destination::Replace(path.to_path_buf()))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn writable_dir(dir: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| "the path holds a NUL byte".to_string())?;
    // SAFETY: a valid C string; access has no other preconditions.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!("its folder `{}` is not writable: {}", dir.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes `path` from `write`: a regular file atomically (temp file, fsync, rename, leftovers of
/// killed writers removed first), a character device or FIFO in place.
pub fn write_file(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    match check_destination(path).map_err(std::io::Error::other)? {
        Destination::InPlace(p) => {
            let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
            write(&mut f)?;
            f.flush()
        }
        Destination::Replace(p) => {
            let dir = parent_of(&p).to_path_buf();
            std::fs::create_dir_all(&dir)?;
            remove_stale_temps(&p);
            let tmp = temp_sibling(&p, TEMP_TAG);
            // PIDs repeat across containers (a restarted pod's runner gets the PID its killed
            // predecessor had, in a PID namespace of its own): a temp file of this PID here is
            // such a predecessor's, never this process's in flight (it writes a target once at a
            // time and removes its temp file on failure).
            let _ = std::fs::remove_file(&tmp);
            let result = (|| {
                let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                let mut w = std::io::BufWriter::new(file);
                write(&mut w)?;
                let file = w.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                std::fs::rename(&tmp, &p)?;
                // The rename itself survives a power loss once the folder is synced.
                if let Ok(d) = std::fs::File::open(&dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result
        }
    }
}

/// `path` made absolute and free of `.`/`..` and symbolic links, also where its tail does not
/// exist yet (the existing part is resolved, the rest appended).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    if let Ok(real) = std::fs::canonicalize(&abs) {
        return real;
    }
    // Lexically first (a missing folder has no links to follow), then the existing part for real.
    let mut lexical = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            c => lexical.push(c),
        }
    }
    let mut existing = lexical.clone();
    let mut tail: Vec<OsString> = vec![];
    while let (Some(name), Some(parent)) = (existing.file_name().map(|n| n.to_os_string()), existing.parent().map(Path::to_path_buf)) {
        tail.push(name);
        existing = parent;
        if let Ok(mut real) = std::fs::canonicalize(&existing) {
            real.extend(tail.iter().rev());
            return real;
        }
    }
    lexical
}

/// Renames `from` to `to` only if `to` does not exist, atomically (renameat2 RENAME_NOREPLACE),
/// so that a concurrent writer cannot be silently replaced.
pub fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("the path holds a NUL byte"));
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: valid C strings, AT_FDCWD-relative paths.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) {
        // A file system without RENAME_NOREPLACE: check, then rename (a small window remains).
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
        }
        return std::fs::rename(from, to);
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_fit_and_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let long = "é".repeat(124) + ".png"; // 252 bytes: a legal name
        let target = dir.path().join(&long);
        let tmp = temp_sibling(&target, TEMP_TAG);
        let name = tmp.file_name().unwrap().as_bytes();
        assert!(name.len() <= NAME_MAX, "{}", name.len());
        assert!(std::str::from_utf8(name).is_ok(), "cut at a character boundary");
        std::fs::write(&tmp, b"mine").unwrap();
        // A dead writer's leftovers go; a live one's (this process) and other files stay.
        let dead = temp_sibling_for(&target, TEMP_TAG, 4_000_000);
        let old = temp_sibling_for(&target, OLD_TAG, 4_000_001);
        std::fs::write(&dead, b"").unwrap();
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("shard"), b"x").unwrap();
        let other = temp_sibling_for(&dir.path().join("other.png"), TEMP_TAG, 4_000_002);
        std::fs::write(&other, b"").unwrap();
        let removed = remove_stale_temps(&target);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dead.exists() && !old.exists() && tmp.exists() && other.exists());
    }

    #[test]
    fn a_killed_writer_with_this_pid_is_no_obstacle() {
        // A pod killed while writing, restarted with the same PID: its temp file is replaced.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("0003-4.png");
        std::fs::write(temp_sibling(&target, TEMP_TAG), b"half").unwrap();
        write_file(&target, |w: &mut dyn Write| w.write_all(b"png")).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"png");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn destinations() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_destination(Path::new("/dev/null")), Ok(Destination::InPlace("/dev/null".into())));
        assert!(check_destination(dir.path()).unwrap_err().contains("is a folder"));
        let nested = dir.path().join("a/b/c.png");
        assert_eq!(check_destination(&nested), Ok(Destination::Replace(nested.clone())));
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(check_destination(&file.join("x.png")).unwrap_err().contains("is not a folder"));
        // A symlink to a file is followed: the link stays a link.
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        write_file(&link, |w: &mut dyn Write| w.write_all(b"new")).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    #[test]
    fn fifos_are_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::read(fifo).unwrap()
        });
        write_file(&fifo, |w| w.write_all(b"png bytes")).unwrap();
        assert_eq!(reader.join().unwrap(), b"png bytes");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");
    }

    #[test]
    fn resolves_missing_tails_and_refuses_replacing() {
        let dir = tempfile::tempdir().unwrap();
        let real = resolve(dir.path());
        assert_eq!(resolve(&dir.path().join("x/../y/./z")), real.join("y/z"));
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        assert_eq!(rename_no_replace(&a, &b).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        rename_no_replace(&a, &dir.path().join("c")).unwrap();
    }
}
