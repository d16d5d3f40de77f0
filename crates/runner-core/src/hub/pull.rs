//! `runner pull`: fetches what a manifest reads from the Hub into the standard cache, as
//! `huggingface_hub`'s `hf_hub_download` lays it out (blobs named by ETag, relative snapshot
//! symlinks, `refs/<revision>`, `.no_exist` markers, `.locks/` file locks shared with Python).
//!
//! Not the `hf-hub` crate: 1.0 brings tokio, reqwest and hf-xet into the light binary and does not
//! read `HF_HUB_OFFLINE`; 0.4 reads neither `HF_HUB_CACHE` nor `HF_TOKEN` and has no listing-based
//! selection. Neither verifies a blob against its ETag. This is ureq (blocking HTTP/1.1 with
//! rustls) and threads.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sha2::Digest;

use super::repo_dir;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{url}: 401 Unauthorized: {}", if *has_token { "the Hub refused the token (HF_TOKEN or the token file): is it valid?" } else { "no token was sent: the repo is private or gated; set HF_TOKEN (or log in with `hf auth login`)" })]
    Unauthorized { url: String, has_token: bool },
    #[error("{url}: 403 Forbidden: the token lacks access to `{repo}` (a gated repo: accept its conditions at {endpoint}/{repo}, with a token that may read it)")]
    Forbidden { url: String, repo: String, endpoint: String },
    #[error("{what}: 404 Not Found ({url})")]
    NotFound { what: String, url: String },
    #[error("{url}: HTTP {status} after {tries} tries{}", retry_note(*status))]
    Status { url: String, status: u16, tries: u32 },
    #[error("{url}: {msg} (after {tries} tries)")]
    Transport { url: String, msg: String, tries: u32 },
    #[error("{url}: {msg}")]
    Protocol { url: String, msg: String },
    #[error("`{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}`: {source}: the partial file is kept (never as a blob); free space and run `runner pull` again to resume it, or delete it", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("`{file}` from `{repo}`: {what} is {got}, the Hub's ETag says {want} (fetched twice: the download or the server is corrupt)")]
    Verify { repo: String, file: String, what: &'static str, want: String, got: String },
    #[error("{0}")]
    Select(String),
    #[error("interrupted")]
    Interrupted,
}

fn retry_note(status: u16) -> &'static str {
    match status {
        429 => ": the Hub is rate-limiting this client (wait, or use a token)",
        500..=599 => ": the Hub (or HF_ENDPOINT) is failing",
        _ => "",
    }
}

/// Where and as whom to reach the Hub.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub endpoint: String,
    token: Option<String>,
    /// Tries of a request answered 429 or 5xx, or whose connection failed (each after a backoff).
    pub tries: u32,
    /// The first backoff (doubled per try, at most 8 s).
    pub backoff: Duration,
}

impl Client {
    /// `HF_ENDPOINT` (default `https://huggingface.co`); the token from `HF_TOKEN` >
    /// `HUGGING_FACE_HUB_TOKEN` > the file `HF_TOKEN_PATH` (default `$HF_HOME/token`), unless
    /// `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set.
    pub fn from_env() -> Client {
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string();
        let env = |n: &str| std::env::var(n).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let implicit = !std::env::var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_ok_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str()));
        let token = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            if !implicit {
                return None;
            }
            let path = env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| super::hf_home().join("token"));
            std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(60)))
            .user_agent(concat!("runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { agent, endpoint, token, tries: 5, backoff: Duration::from_millis(500) }
    }

    fn absolute(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_string()
        } else {
            format!("{}{}", self.endpoint, url)
        }
    }

    /// One request, retried on 429, 5xx and connection failures. The token goes only to the
    /// endpoint's own origin (not to a CDN a redirect names).
    fn send(&self, method: &str, url: &str, range: Option<u64>) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        let mut wait = self.backoff;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut req = ureq::http::Request::builder().method(method).uri(url).header("Accept-Encoding", "identity");
            if let (Some(t), true) = (&self.token, url.strip_prefix(&self.endpoint).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            if let Some(from) = range {
                req = req.header("Range", format!("bytes={from}-"));
            }
            let req = req.body(()).map_err(|e| PullError::Protocol { url: url.into(), msg: e.to_string() })?;
            match self.agent.run(req) {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if (status == 429 || status >= 500) && tries < self.tries {
                        let after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()).map(|s| Duration::from_secs(s.min(60)));
                        tracing::warn!(url, status, tries, "retrying");
                        std::thread::sleep(after.unwrap_or(wait));
                        wait = (wait * 2).min(Duration::from_secs(8));
                        continue;
                    }
                    return Ok(resp);
                }
                Err(e) if tries < self.tries => {
                    tracing::warn!(url, error = %e, tries, "retrying");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(8));
                }
                Err(e) => return Err(PullError::Transport { url: url.into(), msg: e.to_string(), tries }),
            }
        }
    }

    /// Maps a non-success status to its error.
    fn check(&self, resp: &ureq::http::Response<ureq::Body>, url: &str, repo: &str, what: impl FnOnce(&str) -> String) -> Result<(), PullError> {
        let status = resp.status().as_u16();
        match status {
            200..=399 => Ok(()),
            401 => Err(PullError::Unauthorized { url: url.into(), has_token: self.token.is_some() }),
            403 => Err(PullError::Forbidden { url: url.into(), repo: repo.into(), endpoint: self.endpoint.clone() }),
            404 => {
                let code = resp.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("");
                Err(PullError::NotFound { what: what(code), url: url.into() })
            }
            _ => Err(PullError::Status { url: url.into(), status, tries: self.tries }),
        }
    }

    /// `GET /api/models/{repo}/revision/{revision}`: the commit and every file path.
    pub fn repo_info(&self, repo: &str, revision: &str) -> Result<(String, Vec<String>), PullError> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode(revision, true));
        let resp = self.send("GET", &url, None)?;
        self.check(&resp, &url, repo, |code| match code {
            "RevisionNotFound" => format!("revision `{revision}` of `{repo}`"),
            _ => format!("the repo `{repo}` (or it is private: set HF_TOKEN)"),
        })?;
        let body = read_limited(resp, 64 << 20, &url)?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| PullError::Protocol { url: url.clone(), msg: format!("not JSON: {e}") })?;
        let commit = v.get("sha").and_then(|s| s.as_str()).filter(|s| super::is_commit(s)).ok_or_else(|| PullError::Protocol { url: url.clone(), msg: "no commit `sha` in the answer".into() })?;
        let files = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| PullError::Protocol { url: url.clone(), msg: "no `siblings` list in the answer".into() })?
            .iter()
            .filter_map(|s| s.get("rfilename").and_then(|f| f.as_str()).map(str::to_string))
            .collect();
        Ok((commit.to_string(), files))
    }

    /// `HEAD /{repo}/resolve/{commit}/{path}` without following the LFS redirect: the
    /// `X-Linked-Etag`/`ETag`, `X-Linked-Size`/`Content-Length`, and where the bytes are.
    pub fn file_meta(&self, repo: &str, commit: &str, path: &str) -> Result<FileMeta, PullError> {
        let mut url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, encode(path, false));
        for _ in 0..5 {
            let resp = self.send("HEAD", &url, None)?;
            self.check(&resp, &url, repo, |code| match code {
                "EntryNotFound" | "" => format!("`{path}` in `{repo}` at {commit}"),
                other => format!("`{path}` in `{repo}` at {commit} ({other})"),
            })?;
            let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            let location = h("location");
            let status = resp.status().as_u16();
            // A relative redirect (a renamed repo) is followed; an absolute one is the CDN.
            if (300..400).contains(&status) {
                if let Some(loc) = location.as_deref().filter(|l| l.starts_with('/')) {
                    if h("x-linked-etag").is_none() {
                        url = self.absolute(loc);
                        continue;
                    }
                }
            }
            let etag = h("x-linked-etag").or_else(|| h("etag")).map(|e| e.trim().trim_start_matches("W/").trim_matches('"').to_string()).filter(|e| !e.is_empty());
            let etag = etag.ok_or_else(|| PullError::Protocol { url: url.clone(), msg: "no ETag: cannot name the blob".into() })?;
            if etag.contains('/') || etag.contains("..") {
                return Err(PullError::Protocol { url: url.clone(), msg: format!("ETag `{etag}` cannot name a blob") });
            }
            let size = h("x-linked-size").or_else(|| if (300..400).contains(&status) { None } else { h("content-length") }).and_then(|s| s.parse().ok());
            let size = size.ok_or_else(|| PullError::Protocol { url: url.clone(), msg: "no size (X-Linked-Size or Content-Length)".into() })?;
            let location = location.map(|l| self.absolute(&l)).unwrap_or_else(|| url.clone());
            return Ok(FileMeta { etag, size, location, commit: h("x-repo-commit") });
        }
        Err(PullError::Protocol { url, msg: "too many redirects".into() })
    }

    /// A small file's bytes (a config or an index), from the cache when it is there.
    pub fn small(&self, repo: &str, commit: &str, path: &str) -> Result<Vec<u8>, PullError> {
        let url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, encode(path, false));
        let mut url2 = url.clone();
        for _ in 0..5 {
            let resp = self.send("GET", &url2, None)?;
            self.check(&resp, &url2, repo, |_| format!("`{path}` in `{repo}` at {commit}"))?;
            if resp.status().is_redirection() {
                let loc = resp.headers().get("location").and_then(|v| v.to_str().ok()).ok_or_else(|| PullError::Protocol { url: url.clone(), msg: "a redirect without Location".into() })?;
                url2 = self.absolute(loc);
                continue;
            }
            return read_limited(resp, 256 << 20, &url2);
        }
        Err(PullError::Protocol { url, msg: "too many redirects".into() })
    }
}

/// Percent-encodes a revision (with `/`) or a repo path (keeping `/`).
fn encode(s: &str, slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (!slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn read_limited(resp: ureq::http::Response<ureq::Body>, limit: u64, url: &str) -> Result<Vec<u8>, PullError> {
    let mut out = vec![];
    resp.into_body().into_reader().take(limit + 1).read_to_end(&mut out).map_err(|e| PullError::Transport { url: url.into(), msg: e.to_string(), tries: 1 })?;
    if out.len() as u64 > limit {
        return Err(PullError::Protocol { url: url.into(), msg: format!("answer over {limit} bytes") });
    }
    Ok(out)
}

/// What a `HEAD` on a file says.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub etag: String,
    pub size: u64,
    pub location: String,
    pub commit: Option<String>,
}

/// One file to put in the cache.
#[derive(Debug, Clone)]
pub struct Job {
    pub repo: String,
    pub commit: String,
    pub path: String,
    pub meta: FileMeta,
}

/// What happened to a file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub repo: String,
    pub commit: String,
    pub path: String,
    pub size: u64,
    /// The blob's ETag (sha256 for LFS files, git's sha1 otherwise).
    pub etag: String,
    /// `fetched`, `resumed` or `cached`.
    pub status: &'static str,
}

/// Progress callbacks (bytes as they arrive; files as they finish).
pub trait Progress: Sync {
    fn bytes(&self, job: &Job, n: u64);
    fn start(&self, _job: &Job) {}
    fn done(&self, _job: &Job) {}
}

/// Downloads `jobs` into `cache` with `workers` threads; the first error stops the others
/// between reads (partial files stay as `.incomplete`, resumable).
pub fn fetch_all(client: &Client, cache: &Path, jobs: Vec<Job>, workers: usize, progress: &dyn Progress) -> Result<Vec<Fetched>, PullError> {
    let queue = Mutex::new(jobs.into_iter().enumerate().collect::<VecDeque<_>>());
    let results = Mutex::new(vec![]);
    let failed: Mutex<Option<PullError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Some((i, job)) = queue.lock().unwrap().pop_front() else { return };
                progress.start(&job);
                match fetch_one(client, cache, &job, progress, &stop) {
                    Ok(f) => {
                        progress.done(&job);
                        results.lock().unwrap().push((i, f));
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        failed.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let mut r = results.into_inner().unwrap();
    r.sort_by_key(|(i, _)| *i);
    Ok(r.into_iter().map(|(_, f)| f).collect())
}

/// `huggingface_hub`'s lock for a blob: `.locks/models--ORG--NAME/<etag>.lock`, flock'ed.
struct BlobLock(#[allow(dead_code)] std::fs::File);

fn lock_blob(cache: &Path, repo: &str, etag: &str) -> Result<BlobLock, PullError> {
    let dir = cache.join(".locks").join(repo_dir(Path::new(""), repo));
    std::fs::create_dir_all(&dir).map_err(|source| PullError::Io { path: dir.clone(), source })?;
    let path = dir.join(format!("{etag}.lock"));
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|source| PullError::Io { path: path.clone(), source })?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(PullError::Io { path, source: std::io::Error::last_os_error() });
    }
    Ok(BlobLock(f))
}

/// The hash an ETag names: sha256 (64 hex, LFS) or git's blob sha1 (40 hex).
enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
    None,
}

impl Hasher {
    fn for_etag(etag: &str, size: u64) -> Hasher {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        match etag.len() {
            64 if hex => Hasher::Sha256(sha2::Sha256::new()),
            40 if hex => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Hasher::GitSha1(h)
            }
            _ => Hasher::None,
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::GitSha1(h) => h.update(b),
            Hasher::None => {}
        }
    }
    fn finish(self) -> Option<(&'static str, String)> {
        match self {
            Hasher::Sha256(h) => Some(("its sha256", format!("{:x}", h.finalize()))),
            Hasher::GitSha1(h) => Some(("its git sha1", format!("{:x}", h.finalize()))),
            Hasher::None => None,
        }
    }
}

/// One file: the blob (resumed from `.incomplete`, verified against the ETag, renamed into
/// place), the snapshot symlink, the ref.
fn fetch_one(client: &Client, cache: &Path, job: &Job, progress: &dyn Progress, stop: &AtomicBool) -> Result<Fetched, PullError> {
    let rdir = repo_dir(cache, &job.repo);
    let blobs = rdir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|source| PullError::Io { path: blobs.clone(), source })?;
    let blob = blobs.join(&job.meta.etag);
    let _lock = lock_blob(cache, &job.repo, &job.meta.etag)?;
    let mut status = "cached";
    let have = std::fs::metadata(&blob).ok().filter(|m| m.is_file()).map(|m| m.len());
    if have != Some(job.meta.size) {
        let incomplete = blobs.join(format!("{}.incomplete", job.meta.etag));
        status = if std::fs::metadata(&incomplete).is_ok_and(|m| m.len() > 0) { "resumed" } else { "fetched" };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match download(client, job, &incomplete, progress, stop)? {
                None => break,
                Some((what, want, got)) if attempt >= 2 => {
                    let _ = std::fs::remove_file(&incomplete);
                    return Err(PullError::Verify { repo: job.repo.clone(), file: job.path.clone(), what, want, got });
                }
                Some((what, _, got)) => {
                    tracing::warn!(file = %job.path, what, got, "does not match its ETag: fetching it again");
                    let _ = std::fs::remove_file(&incomplete);
                }
            }
        }
        std::fs::rename(&incomplete, &blob).map_err(|source| PullError::Io { path: blob.clone(), source })?;
    } else {
        progress.bytes(job, job.meta.size);
    }
    link_snapshot(&rdir, &job.commit, &job.path, &job.meta.etag)?;
    Ok(Fetched { repo: job.repo.clone(), commit: job.commit.clone(), path: job.path.clone(), size: job.meta.size, etag: job.meta.etag.clone(), status })
}

/// Streams the file into `incomplete`, resuming from its length; `Some((what, want, got))` when
/// the finished file does not match the ETag.
fn download(client: &Client, job: &Job, incomplete: &Path, progress: &dyn Progress, stop: &AtomicBool) -> Result<Option<(&'static str, String, String)>, PullError> {
    let io = |source| PullError::Io { path: incomplete.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(incomplete).map_err(io)?;
    let mut hasher = Hasher::for_etag(&job.meta.etag, job.meta.size);
    let mut have = f.metadata().map_err(io)?.len();
    if have > job.meta.size {
        f.set_len(0).map_err(io)?;
        have = 0;
    }
    // Hash what an earlier run left, so that the whole file is verified.
    {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = have;
        while left > 0 {
            let n = f.read(&mut buf[..left.min(1 << 20) as usize]).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        progress.bytes(job, have);
    }
    let mut drops = 0;
    let mut buf = vec![0u8; 1 << 20];
    while have < job.meta.size {
        if stop.load(Ordering::Relaxed) {
            return Err(PullError::Interrupted);
        }
        let resp = client.send("GET", &job.meta.location, (have > 0).then_some(have))?;
        client.check(&resp, &job.meta.location, &job.repo, |_| format!("`{}` in `{}`", job.path, job.repo))?;
        match resp.status().as_u16() {
            206 => {}
            200 if have > 0 => {
                // The server ignored the range: start over.
                use std::io::Seek;
                f.set_len(0).map_err(io)?;
                f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
                have = 0;
                hasher = Hasher::for_etag(&job.meta.etag, job.meta.size);
            }
            200 => {}
            s => return Err(PullError::Protocol { url: job.meta.location.clone(), msg: format!("HTTP {s} for the file's bytes") }),
        }
        let mut r = resp.into_body().into_reader();
        let dropped = loop {
            if stop.load(Ordering::Relaxed) {
                return Err(PullError::Interrupted);
            }
            match r.read(&mut buf) {
                Ok(0) => break have < job.meta.size,
                Ok(n) => {
                    let n = n.min((job.meta.size - have) as usize);
                    f.write_all(&buf[..n]).map_err(|source| PullError::Write { path: incomplete.to_path_buf(), source })?;
                    hasher.update(&buf[..n]);
                    have += n as u64;
                    progress.bytes(job, n as u64);
                    if have == job.meta.size {
                        break false;
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %job.path, error = %e, have, "connection dropped: resuming");
                    break true;
                }
            }
        };
        if dropped {
            drops += 1;
            if drops > client.tries {
                return Err(PullError::Transport { url: job.meta.location.clone(), msg: format!("the connection dropped at byte {have} of {}", job.meta.size), tries: drops });
            }
            std::thread::sleep(client.backoff);
        }
    }
    f.sync_all().map_err(|source| PullError::Write { path: incomplete.to_path_buf(), source })?;
    Ok(hasher.finish().and_then(|(what, got)| (got != job.meta.etag).then(|| (what, job.meta.etag.clone(), got))))
}

/// `snapshots/<commit>/<path>` → `../../blobs/<etag>` (one more `../` per subfolder), replaced
/// atomically.
fn link_snapshot(rdir: &Path, commit: &str, path: &str, etag: &str) -> Result<(), PullError> {
    let link = rdir.join("snapshots").join(commit).join(path);
    let parent = link.parent().expect("a snapshot file has a folder");
    std::fs::create_dir_all(parent).map_err(|source| PullError::Io { path: parent.to_path_buf(), source })?;
    let depth = path.matches('/').count();
    let target = format!("{}../../blobs/{etag}", "../".repeat(depth));
    if std::fs::read_link(&link).is_ok_and(|t| t == Path::new(&target)) {
        return Ok(());
    }
    let tmp = crate::fsutil::temp_sibling(&link, "link");
    std::os::unix::fs::symlink(&target, &tmp).map_err(|source| PullError::Io { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, &link).map_err(|source| PullError::Io { path: link.clone(), source })
}

/// `refs/<revision>` = commit (written atomically), unless the revision is the commit.
pub fn write_ref(cache: &Path, repo: &str, revision: &str, commit: &str) -> Result<(), PullError> {
    if revision == commit {
        return Ok(());
    }
    let path = repo_dir(cache, repo).join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == commit) {
        return Ok(());
    }
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|source| PullError::Io { path: p.to_path_buf(), source })?;
    }
    crate::fsutil::write_file(&path, |w| w.write_all(commit.as_bytes())).map_err(|source| PullError::Io { path, source })
}

/// `.no_exist/<commit>/<path>`: the Hub has no such file at that commit.
pub fn mark_missing(cache: &Path, repo: &str, commit: &str, path: &str) {
    let marker = repo_dir(cache, repo).join(".no_exist").join(commit).join(path);
    if let Some(p) = marker.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let _ = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(marker);
}

/// `runner pull`'s settings.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// List what would be fetched (with sizes) and write nothing.
    pub dry_run: bool,
    /// Concurrent transfers.
    pub workers: usize,
    /// Revisions pinned to commits (`--locked`).
    pub pins: super::Pins,
}

/// What `runner pull` did (or, dry, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    pub cache: PathBuf,
    pub dry_run: bool,
    pub files: Vec<Fetched>,
    /// Bytes of every selected file.
    pub bytes: u64,
    /// Bytes transferred (not already in the cache).
    pub fetched_bytes: u64,
    pub seconds: f64,
}

/// A repo at a commit, listed by the Hub, its small files read from the cache or the Hub.
struct Remote<'a> {
    client: &'a Client,
    cache: &'a Path,
    repo: String,
    commit: String,
    files: Vec<String>,
}

impl super::select::RepoView for Remote<'_> {
    fn files(&self) -> &[String] {
        &self.files
    }
    fn read(&mut self, path: &str) -> Result<Vec<u8>, String> {
        let cached = repo_dir(self.cache, &self.repo).join("snapshots").join(&self.commit).join(path);
        if let Ok(b) = std::fs::read(&cached) {
            return Ok(b);
        }
        self.client.small(&self.repo, &self.commit, path).map_err(|e| e.to_string())
    }
}

/// Whether a component whose weights come from `src` still reads the pipeline folder's
/// `config.json` (as [`crate::checkpoint::layout::PipelineFolder::files`] decides): a GGUF file
/// always; a local folder or file without a `config.json` beside it; a Hub file (its folder's
/// listing is another repo's: the config is fetched, a few KB).
fn needs_pipeline_config(m: &crate::manifest::LoadedManifest, key: &str, src: &Path) -> bool {
    let s = src.to_string_lossy();
    if s.ends_with(".gguf") {
        return true;
    }
    if super::is_hub(&s) {
        return super::is_file_path(&s);
    }
    let p = m.resolve_path(key, src);
    let dir = if p.is_dir() { p } else { p.parent().map(Path::to_path_buf).unwrap_or_default() };
    !dir.join("config.json").is_file()
}

/// A manifest key, its Hub name, and what it reads.
type Source = (String, super::HubName, super::select::Role);

/// The manifest's Hub sources with what each reads.
fn roles(m: &crate::manifest::LoadedManifest) -> Vec<Source> {
    use super::select::{ComponentSay, Role};
    use crate::checkpoint::layout::VariantPolicy;
    let man = &m.manifest;
    let mut out = vec![];
    for (key, h) in &m.hub {
        let role = if key == "pipeline.source" {
            let components = man
                .components
                .iter()
                .map(|(n, c)| {
                    let needs_config = c.source.as_ref().is_some_and(|src| needs_pipeline_config(m, &format!("components.{n}.source"), src));
                    (n.clone(), ComponentSay { enabled: c.enabled, variant: c.variant.clone(), has_source: c.source.is_some(), needs_config })
                })
                .collect();
            Role::Pipeline { variant: man.pipeline.variant.clone(), components }
        } else if let Some(name) = key.strip_prefix("components.").and_then(|k| k.strip_suffix(".source")) {
            let c = &man.components[name];
            if c.enabled == Some(false) {
                continue;
            }
            let policy = if c.variant.is_some() { VariantPolicy::Require } else { VariantPolicy::FallBack };
            Role::Component { library: None, variant: c.variant.clone().or_else(|| man.pipeline.variant.clone()), policy }
        } else {
            Role::File
        };
        out.push((key.clone(), h.name.clone(), role));
    }
    out
}

/// Runs `f` over `items` on up to `workers` threads, in order.
fn par_map<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Mutex<Vec<(usize, R)>> = Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                let r = f(item);
                out.lock().unwrap().push((i, r));
            });
        }
    });
    let mut v = out.into_inner().unwrap();
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, r)| r).collect()
}

/// Fetches every file the manifest's `hf://` sources read into `cache`: one listing per repo
/// and revision, diffusers' selection ([`super::select`]), a `HEAD` per file for its ETag and
/// size, then the transfers; `refs/<revision>` last, so that a pull cut short leaves no ref to a
/// partial snapshot.
pub fn pull_manifest(client: &Client, cache: &Path, m: &crate::manifest::LoadedManifest, opts: &PullOptions, progress: &dyn PullProgress) -> Result<PullReport, PullError> {
    let started = std::time::Instant::now();
    let mut groups: std::collections::BTreeMap<(String, String), Vec<Source>> = Default::default();
    for (key, name, role) in roles(m) {
        groups.entry((name.repo.clone(), name.revision().to_string())).or_default().push((key, name, role));
    }
    let mut jobs: Vec<(String, String, String)> = vec![];
    let mut refs = vec![];
    for ((repo, revision), sources) in &groups {
        let pinned = opts.pins.get(&(repo.clone(), revision.clone()));
        let (commit, files) = client.repo_info(repo, pinned.map_or(revision.as_str(), String::as_str))?;
        if let Some(p) = pinned {
            if &commit != p {
                return Err(PullError::Protocol { url: format!("{}/{repo}", client.endpoint), msg: format!("asked for the pinned commit {p}, the Hub answered {commit}") });
            }
        } else {
            refs.push((repo.clone(), revision.clone(), commit.clone()));
        }
        let mut view = Remote { client, cache, repo: repo.clone(), commit: commit.clone(), files };
        for (key, name, role) in sources {
            let path = name.path.clone().unwrap_or_default();
            if name.is_file() && !view.files.contains(&path) && !opts.dry_run {
                mark_missing(cache, repo, &commit, &path);
            }
            let label = format!("`{key}` = `{name}` (commit {commit})");
            for f in super::select::select(&mut view, &label, &path, role).map_err(PullError::Select)? {
                jobs.push((repo.clone(), commit.clone(), f));
            }
        }
    }
    jobs.sort();
    jobs.dedup();
    progress.listed(jobs.len());
    let metas = par_map(&jobs, opts.workers, |(repo, commit, path)| client.file_meta(repo, commit, path));
    let mut planned = vec![];
    for ((repo, commit, path), meta) in jobs.into_iter().zip(metas) {
        let meta = meta?;
        if let Some(c) = meta.commit.as_deref().filter(|c| *c != commit) {
            return Err(PullError::Protocol { url: meta.location.clone(), msg: format!("`{path}`: the Hub answered for commit {c}, not {commit}") });
        }
        planned.push(Job { repo, commit, path, meta });
    }
    let bytes: u64 = planned.iter().map(|j| j.meta.size).sum();
    let in_cache = |j: &Job| std::fs::metadata(repo_dir(cache, &j.repo).join("blobs").join(&j.meta.etag)).is_ok_and(|md| md.is_file() && md.len() == j.meta.size);
    let fetched_bytes: u64 = planned.iter().filter(|j| !in_cache(j)).map(|j| j.meta.size).sum();
    if opts.dry_run {
        let files = planned
            .iter()
            .map(|j| Fetched {
                repo: j.repo.clone(),
                commit: j.commit.clone(),
                path: j.path.clone(),
                size: j.meta.size,
                etag: j.meta.etag.clone(),
                status: if in_cache(j) { "cached" } else { "to fetch" },
            })
            .collect();
        return Ok(PullReport { cache: cache.to_path_buf(), dry_run: true, files, bytes, fetched_bytes, seconds: started.elapsed().as_secs_f64() });
    }
    progress.total(bytes);
    let files = fetch_all(client, cache, planned, opts.workers, progress.as_progress())?;
    for (repo, revision, commit) in refs {
        write_ref(cache, &repo, &revision, &commit)?;
    }
    Ok(PullReport { cache: cache.to_path_buf(), dry_run: false, files, bytes, fetched_bytes, seconds: started.elapsed().as_secs_f64() })
}

/// [`Progress`] with the phases before the transfers.
pub trait PullProgress: Progress {
    fn listed(&self, _files: usize) {}
    fn total(&self, _bytes: u64) {}
    fn as_progress(&self) -> &dyn Progress;
}
