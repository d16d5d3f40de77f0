//! Models by Hub name (`hf://ORG/NAME[@REVISION][/PATH]`), read from the Hugging Face cache as
//! `huggingface_hub` lays it out (<https://huggingface.co/docs/hub/local-cache>):
//!
//! ```text
//! <cache>/models--ORG--NAME/blobs/<etag>                 file contents (sha256 for LFS, git sha1 otherwise)
//!                          /refs/<revision>              the commit a branch or tag points at
//!                          /snapshots/<commit>/<path>    relative symlinks into blobs/
//!                          /.no_exist/<commit>/<path>    the Hub said: no such file at that commit
//! ```
//!
//! Resolving never uses the network: `validate`, `plan`, `run` and `serve` read the cache only;
//! `runner pull` ([`pull`]) fills it.

pub mod pull;
pub mod select;

use std::path::{Path, PathBuf};

/// A Hub source as a manifest writes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HubName {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit as written (`None`: `main`).
    pub revision: Option<String>,
    /// A folder or file inside the repo (`None`: the repo root).
    pub path: Option<String>,
}

pub const SCHEME: &str = "hf://";

/// Whether a source value names the Hub (`hf://…`) rather than a local path.
pub fn is_hub(s: &str) -> bool {
    s.starts_with(SCHEME)
}

impl HubName {
    /// Parses `hf://ORG/NAME[@REVISION][/PATH…]`. A revision with `/` (`refs/pr/1`) is written
    /// `%2F`-encoded, as `huggingface_hub`'s `HfFileSystem` does.
    pub fn parse(s: &str) -> Result<HubName, String> {
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| format!("`{s}` does not start with `{SCHEME}`"))?;
        if rest.contains('\\') {
            return Err(format!("`{s}`: `\\` is not allowed in a Hub name"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("`{s}` must be `hf://ORG/NAME[@REVISION][/PATH]`, with no empty parts (and no leading or trailing `/`)"));
        }
        let org = parts[0];
        let (name, revision) = match parts[1].split_once('@') {
            Some((n, r)) => {
                let r = r.replace("%2F", "/").replace("%2f", "/");
                if r.is_empty() {
                    return Err(format!("`{s}`: the revision after `@` is empty"));
                }
                (n, Some(r))
            }
            None => (parts[1], None),
        };
        for (what, part) in [("organisation", org), ("repository name", name)] {
            check_repo_part(part).map_err(|e| format!("`{s}`: the {what} `{part}` {e}"))?;
        }
        if let Some(r) = &revision {
            let ok_chars = r.chars().all(|c| c.is_ascii_alphanumeric() || "._-/+".contains(c));
            if !ok_chars || r.starts_with('/') || r.ends_with('/') || r.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                return Err(format!("`{s}`: the revision `{r}` is not a branch, tag or commit name"));
            }
        }
        let path = &parts[2..];
        if let Some(bad) = path.iter().find(|p| **p == "." || **p == "..") {
            return Err(format!("`{s}`: `{bad}` is not allowed in a Hub path"));
        }
        let path = (!path.is_empty()).then(|| path.join("/"));
        Ok(HubName { repo: format!("{org}/{name}"), revision, path })
    }

    /// The revision to resolve (`main` when none is written).
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// Whether the path names one file (a weight file or an index) rather than a folder.
    pub fn is_file(&self) -> bool {
        self.path.as_deref().is_some_and(is_file_path)
    }

    /// This name pinned at `commit` (what a lock records).
    pub fn at(&self, commit: &str) -> HubName {
        HubName { revision: Some(commit.to_string()), ..self.clone() }
    }

    /// The folder of this repo in the cache (`models--ORG--NAME`).
    pub fn repo_dir(&self, cache: &Path) -> PathBuf {
        repo_dir(cache, &self.repo)
    }
}

impl std::fmt::Display for HubName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}", self.repo)?;
        if let Some(r) = &self.revision {
            write!(f, "@{}", r.replace('/', "%2F"))?;
        }
        if let Some(p) = &self.path {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

/// `huggingface_hub`'s `validate_repo_id` rules for one part of `ORG/NAME`.
fn check_repo_part(p: &str) -> Result<(), &'static str> {
    if p.len() > 96 {
        return Err("is longer than 96 characters");
    }
    if !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err("may hold only letters, digits, `-`, `_` and `.`");
    }
    if p.contains("--") || p.contains("..") {
        return Err("may not contain `--` or `..`");
    }
    if p.starts_with(['-', '.']) || p.ends_with(['-', '.']) {
        return Err("may not start or end with `-` or `.`");
    }
    Ok(())
}

/// A path inside a repo that names a file: weights, an index, a config.
pub fn is_file_path(p: &str) -> bool {
    let last = p.rsplit('/').next().unwrap_or(p);
    [".safetensors", ".gguf", ".json", ".bin", ".txt", ".model"].iter().any(|e| last.ends_with(e))
}

/// `cache/models--ORG--NAME`.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Whether `s` is a full commit hash.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `~/x` as the shell (and Python's `expanduser`) reads it.
fn expand_home(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(rest)).unwrap_or_else(|| PathBuf::from(p)),
        None => PathBuf::from(p),
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`).
pub fn hf_home() -> PathBuf {
    if let Some(h) = env_nonempty("HF_HOME") {
        return expand_home(&h);
    }
    let xdg = env_nonempty("XDG_CACHE_HOME").map(|x| expand_home(&x)).unwrap_or_else(|| expand_home("~/.cache"));
    xdg.join("huggingface")
}

/// The Hub cache: `HF_HUB_CACHE` > `HUGGINGFACE_HUB_CACHE` > `$HF_HOME/hub`.
pub fn cache_dir() -> PathBuf {
    env_nonempty("HF_HUB_CACHE").or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE")).map(|p| expand_home(&p)).unwrap_or_else(|| hf_home().join("hub"))
}

/// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to 1/ON/YES/TRUE.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|v| std::env::var(v).is_ok_and(|s| ["1", "on", "yes", "true"].contains(&s.trim().to_ascii_lowercase().as_str())))
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    #[error("`{name}`: revision `{revision}` of `{repo}` is not in the Hugging Face cache `{}` (no `refs/{revision}`)", cache.display())]
    NoRevision { name: String, repo: String, revision: String, cache: PathBuf },
    #[error("`{name}`: `{}` holds `{found}`, not a commit hash", path.display())]
    BadRef { name: String, path: PathBuf, found: String },
    #[error("`{name}`: `{}` is not in the Hugging Face cache", path.display())]
    NotCached { name: String, path: PathBuf },
    #[error("`{name}`: the Hub said `{file}` does not exist at commit {commit} (`{}`)", marker.display())]
    KnownMissing { name: String, file: String, commit: String, marker: PathBuf },
    #[error("`{name}`: `{}` points outside the cache's blobs (`{}`): refused", path.display(), target.display())]
    Escapes { name: String, path: PathBuf, target: PathBuf },
}

impl HubError {
    /// Whether `runner pull` would fix it.
    pub fn needs_pull(&self) -> bool {
        matches!(self, HubError::NoRevision { .. } | HubError::NotCached { .. })
    }
}

/// The commit `name` resolves to in the cache: a commit as written, else `refs/<revision>`.
/// `pins` (from a lock, `--locked`) map `ORG/NAME@REVISION` to the commit to use instead.
pub fn commit_in_cache(cache: &Path, name: &HubName, pins: &Pins) -> Result<String, HubError> {
    let rev = name.revision();
    if let Some(c) = pins.get(&(name.repo.clone(), rev.to_string())) {
        return Ok(c.clone());
    }
    if is_commit(rev) {
        return Ok(rev.to_string());
    }
    let path = name.repo_dir(cache).join("refs").join(rev);
    match std::fs::read_to_string(&path) {
        Ok(s) if is_commit(s.trim()) => Ok(s.trim().to_string()),
        Ok(s) => Err(HubError::BadRef { name: name.to_string(), path, found: s.trim().chars().take(64).collect() }),
        Err(_) => Err(HubError::NoRevision { name: name.to_string(), repo: name.repo.clone(), revision: rev.to_string(), cache: cache.to_path_buf() }),
    }
}

/// `ORG/NAME`, revision as written → commit.
pub type Pins = std::collections::BTreeMap<(String, String), String>;

/// Resolves a Hub name to its snapshot path (a folder or a file) in the cache, refusing snapshot
/// symlinks that lead outside the repo's `blobs/`.
pub fn resolve(cache: &Path, name: &HubName, pins: &Pins) -> Result<Resolved, HubError> {
    let commit = commit_in_cache(cache, name, pins)?;
    let snapshot = name.repo_dir(cache).join("snapshots").join(&commit);
    let path = match &name.path {
        Some(p) => snapshot.join(p),
        None => snapshot.clone(),
    };
    if std::fs::symlink_metadata(&path).is_err() {
        if let Some(p) = &name.path {
            let marker = name.repo_dir(cache).join(".no_exist").join(&commit).join(p);
            if marker.exists() {
                return Err(HubError::KnownMissing { name: name.to_string(), file: p.clone(), commit, marker });
            }
        }
        return Err(HubError::NotCached { name: name.to_string(), path });
    }
    check_contained(name, &name.repo_dir(cache).join("blobs"), &path)?;
    Ok(Resolved { path, commit, snapshot })
}

/// A resolved Hub name.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The snapshot path of the name (`snapshots/<commit>/<path>`).
    pub path: PathBuf,
    pub commit: String,
    /// `snapshots/<commit>`.
    pub snapshot: PathBuf,
}

/// Every symlink at or under `path` must lead into `blobs` (a cache written by hand or by a
/// hostile archive could point a weight file at `/dev/sda` or `~/.ssh`).
fn check_contained(name: &HubName, blobs: &Path, path: &Path) -> Result<(), HubError> {
    let blobs_real = std::fs::canonicalize(blobs).unwrap_or_else(|_| blobs.to_path_buf());
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        if md.file_type().is_symlink() {
            let target = std::fs::canonicalize(&p).unwrap_or_else(|_| std::fs::read_link(&p).unwrap_or_default());
            if !target.starts_with(&blobs_real) {
                return Err(HubError::Escapes { name: name.to_string(), path: p, target });
            }
        } else if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        let n = HubName::parse("hf://black-forest-labs/FLUX.1-dev").unwrap();
        assert_eq!((n.repo.as_str(), n.revision.as_deref(), n.path.as_deref()), ("black-forest-labs/FLUX.1-dev", None, None));
        let n = HubName::parse("hf://stabilityai/sdxl@v1.0/unet").unwrap();
        assert_eq!((n.revision.as_deref(), n.path.as_deref(), n.is_file()), (Some("v1.0"), Some("unet"), false));
        let n = HubName::parse("hf://city96/FLUX.1-dev-gguf@refs%2Fpr%2F3/flux1-dev-Q4_K_S.gguf").unwrap();
        assert_eq!((n.revision.as_deref(), n.is_file()), (Some("refs/pr/3"), true));
        assert_eq!(n.to_string(), "hf://city96/FLUX.1-dev-gguf@refs%2Fpr%2F3/flux1-dev-Q4_K_S.gguf");
        for bad in [
            "hf://",
            "hf://org",
            "hf://org/",
            "hf:///name",
            "hf://org//name",
            "hf://org/name/",
            "hf://org/name/../x",
            "hf://org/name/./x",
            "hf://org/name@",
            "hf://org/name@../x",
            "hf://../name",
            "hf://org/na--me",
            "hf://org/-name",
            "hf://org/name/a\\b",
            "hf://org/n ame",
        ] {
            assert!(HubName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repo_folder_and_commits() {
        assert_eq!(repo_dir(Path::new("/c"), "a/B"), PathBuf::from("/c/models--a--B"));
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
        assert!(!is_commit("0123456789ABCDEF0123456789abcdef01234567"));
    }
}
