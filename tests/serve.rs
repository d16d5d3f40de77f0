//! `runner serve`: the real binary on a free port, spoken to over raw HTTP/1.1; a served image
//! equals `runner run`'s with the same `--set` flags, byte for byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{root, run, runner};

const M: &str = "manifests/tiny-sd15.toml";

/// A running server, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The folder of `runner serve`'s step gate (`RUNNER_TEST_STEP_GATE`, a test hook in
/// src/serve/mod.rs): a served job's step `i` runs once `open` or `step-{i}` exists there. A
/// job held at a closed gate runs until the test opens it or cancels it, on any machine.
struct Gate(tempfile::TempDir);

impl Gate {
    fn new() -> Gate {
        Gate(tempfile::tempdir().unwrap())
    }

    fn open(&self) {
        std::fs::write(self.0.path().join("open"), "").unwrap();
    }

    /// Lets every job run its step `i` (0-based) while the gate is closed.
    fn allow_step(&self, i: usize) {
        std::fs::write(self.0.path().join(format!("step-{i}")), "").unwrap();
    }

    fn close(&self) {
        for e in std::fs::read_dir(self.0.path()).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
    }
}

/// Polls `/metrics` until `name` is at least `at_least`.
fn wait_metric(port: u16, name: &str, labels: &[&str], at_least: f64) {
    let t = Instant::now();
    while metric(&metrics_text(port), name, labels) < at_least {
        assert!(t.elapsed() < Duration::from_secs(60), "{name} {labels:?} never reached {at_least}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn serve_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("runner"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RUNNER_") {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(root()).env("NO_COLOR", "1").env("OMP_NUM_THREADS", crate::util::threads().to_string()).env_remove("RUST_LOG").arg("serve").args(args);
    cmd
}

/// Starts `runner serve ARGS --listen 127.0.0.1:0`, reads the bound port from its first line
/// and waits for `/readyz`.
fn start(args: &[&str]) -> Server {
    launch(serve_cmd(args))
}

/// [`start`] with the worker's step gate in `gate`: served jobs wait before each denoising step
/// until the test opens it.
fn start_gated(args: &[&str], gate: &Gate) -> Server {
    let mut cmd = serve_cmd(args);
    cmd.env("RUNNER_TEST_STEP_GATE", gate.0.path());
    launch(cmd)
}

/// [`start`] of a prepared `runner serve` command (stderr inherited unless the caller set it).
fn launch(mut cmd: Command) -> Server {
    let mut child = cmd.args(["--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn().expect("spawns");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().strip_prefix("listening on http://127.0.0.1:").unwrap_or_else(|| panic!("first line: {line:?}")).parse().unwrap();
    let server = Server { child, port };
    let t = Instant::now();
    loop {
        let (status, _, _) = request(server.port, "GET", "/readyz", b"");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "not ready means 503");
        assert!(t.elapsed() < Duration::from_secs(120), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// One request over a fresh connection: (status, headers lowercased, body).
fn request(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    request_with(port, method, path, body, &[])
}

/// [`request`] with extra header lines (`"Authorization: Bearer x"`).
fn request_with(port: u16, method: &str, path: &str, body: &[u8], headers: &[&str]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // A body over the limit may be refused before it is read: the answer counts, not the write.
    let _ = s.write_all(body);
    let mut raw = vec![];
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if header(&headers, "transfer-encoding") == Some("chunked") {
        body = dechunk(&body);
    }
    (status, headers, body)
}

/// A chunked body's bytes.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let n = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + n]);
        raw = &raw[eol + 4 + n..];
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn post(port: u16, body: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    request(port, "POST", "/v1/images", body.as_bytes())
}

fn error_field(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["field"].clone()
}

/// `runner run` with these flags: the PNG's bytes.
fn runner_run(sets: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let mut cmd = runner();
    cmd.args(["run", M, "--quiet"]).arg("--out").arg(&out);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let (code, _, stderr) = run(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    std::fs::read(&out).unwrap()
}

#[test]
fn serve_answers_like_runner_run() {
    // The base flags apply to both: the server's manifest is the one `runner run` sees.
    // (The manifest's own steps, 4, would be over `max_steps`: the server would not start.)
    let base = ["serve.max_steps=3", "run.guidance_scale=5.0", "run.steps=3"];
    let mut args = vec![M];
    for s in &base {
        args.extend(["--set", s]);
    }
    let s = start(&args);
    let (status, _, body) = request(s.port, "GET", "/healthz", b"");
    assert_eq!((status, body.is_empty()), (200, false));

    // PNG: the bytes of `runner run` with the same overrides.
    let (status, headers, png) = post(s.port, r#"{"prompt": "a dog", "seed": 3, "steps": 2, "negative_prompt": "blurry"}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    assert_eq!(header(&headers, "content-type"), Some("image/png"));
    let want = runner_run(&[base[0], base[1], base[2], "run.prompt=a dog", "run.seed=3", "run.steps=2", "run.negative_prompt=blurry"]);
    assert!(png == want, "served PNG differs from runner run's ({} vs {} bytes)", png.len(), want.len());

    // JSON: base64 PNGs, the seed, timings; a batch.
    let (status, headers, body) = post(s.port, r#"{"prompt": "a dog", "seed": 3, "steps": 2, "negative_prompt": "blurry", "response": "json"}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["seed"], 3);
    assert!(v["timings"]["total_s"].as_f64().unwrap() > 0.0, "{v}");
    use base64::Engine as _;
    let images: Vec<Vec<u8>> = v["images"].as_array().unwrap().iter().map(|i| base64::engine::general_purpose::STANDARD.decode(i.as_str().unwrap()).unwrap()).collect();
    assert!(images.len() == 1 && images[0] == want);
    let (status, _, body) = post(s.port, r#"{"prompt": "a cat", "steps": 1, "batch": 2, "width": 32, "height": 32, "response": "json"}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((v["images"].as_array().unwrap().len(), v["seed"].as_u64(), v["width"].as_u64()), (2, Some(0), Some(32)), "the manifest's seed");

    // A scheduler of the request's (diffusers' `from_config` on the folder's config): runner
    // run's with `--set pipeline.scheduler`.
    let (status, _, png) = post(s.port, r#"{"prompt": "a dog", "seed": 3, "steps": 2, "scheduler": "euler-ancestral"}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    assert!(
        png == runner_run(&[base[0], base[1], base[2], "run.prompt=a dog", "run.seed=3", "run.steps=2", "pipeline.scheduler=euler-ancestral"]),
        "served PNG with a scheduler differs from runner run's"
    );
    assert!(png != want);

    // Seeds take the whole u64 range, as `--set run.seed` does.
    for seed in [u64::MAX, 1 << 63] {
        let (status, _, body) = post(s.port, &format!(r#"{{"prompt": "a dog", "seed": {seed}, "steps": 1, "response": "json"}}"#));
        assert_eq!(status, 200, "{seed}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["seed"].as_u64(), Some(seed));
        let png = base64::engine::general_purpose::STANDARD.decode(v["images"][0].as_str().unwrap()).unwrap();
        assert!(png == runner_run(&[base[0], base[1], base[2], "run.prompt=a dog", &format!("run.seed={seed}"), "run.steps=1"]), "seed {seed}: served PNG differs from runner run's");
    }

    // 422 naming the field: unknown, wrong type, missing prompt, over a limit; malformed JSON.
    for (body, field) in [
        (r#"{"prompt": "a", "sed": 3}"#, serde_json::json!("sed")),
        (r#"{"prompt": "a", "steps": "many"}"#, serde_json::json!("steps")),
        (r#"{"prompt": "a", "seed": -1}"#, serde_json::json!("seed")),
        (r#"{"prompt": "a", "seed": 1e30}"#, serde_json::json!("seed")),
        (r#"{"prompt": "a", "seed": 18446744073709551616}"#, serde_json::json!("seed")),
        (r#"{"prompt": "a", "width": 4000000000}"#, serde_json::json!("width")),
        (r#"{"prompt": "a", "steps": 0}"#, serde_json::json!("steps")),
        (r#"{"seed": 1}"#, serde_json::json!("prompt")),
        (r#"{"prompt": "a", "steps": 4}"#, serde_json::json!("steps")),
        (r#"{"prompt": "a", "response": "gif"}"#, serde_json::json!("response")),
        (r#"{"prompt": "a", "steps": 2, "scheduler": "flow-match-euler"}"#, serde_json::json!("scheduler")),
        (r#"{"prompt": "a", "steps": 2, "scheduler": "heun"}"#, serde_json::json!("scheduler")),
        (r#"{"prompt": "a", "dtype": "fp16"}"#, serde_json::json!("dtype")),
        (r#"{"prompt": "a", "output": "x.png"}"#, serde_json::json!("output")),
        (r#"{"prompt": "a""#, serde_json::Value::Null),
        ("[1]", serde_json::Value::Null),
    ] {
        let (status, headers, b) = post(s.port, body);
        assert_eq!(status, 422, "{body}: {}", String::from_utf8_lossy(&b));
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(error_field(&b), field, "{body}: {}", String::from_utf8_lossy(&b));
    }
    // The limit is named in the message.
    let (_, _, b) = post(s.port, r#"{"prompt": "a", "steps": 4}"#);
    assert!(String::from_utf8_lossy(&b).contains("serve.max_steps"));

    // A 100k-character prompt is truncated to CLIP's 77 tokens, as diffusers does, and said.
    let long = serde_json::json!({"prompt": "a ".repeat(50_000), "steps": 1, "response": "json"}).to_string();
    let (status, _, body) = post(s.port, &long);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("77 tokens")), "{v}");

    // 413: a body over the limit.
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5 << 20));
    let (status, _, _) = post(s.port, &big);
    assert_eq!(status, 413);

    // Still serving.
    let (status, _, _) = request(s.port, "GET", "/readyz", b"");
    assert_eq!(status, 200);
}

#[test]
fn serve_refuses_non_loopback_without_insecure_bind() {
    let out = serve_cmd(&[M, "--listen", "0.0.0.0:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-bind") && stderr.contains("serve.token_env"), "{stderr}");
    let out = serve_cmd(&[M, "--listen", "localhost"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen localhost"));
    // What preflight knows stops the server before it listens.
    let out = serve_cmd(&[M, "--listen", "127.0.0.1:0", "--set", "pipeline.scheduler=flow-match-euler"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flow-matching"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "it listened: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn serve_answers_429_when_the_queue_is_full() {
    let gate = Gate::new();
    let (s, held) = full_queue(&gate);
    let (status, headers, body) = post(s.port, r#"{"prompt": "a", "steps": 2}"#);
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert!(header(&headers, "retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{headers:?}");
    assert_eq!(error_field(&body), serde_json::Value::Null);
    // Opened, the two accepted jobs are answered.
    gate.open();
    for (name, t) in ["running", "waiting"].into_iter().zip(held) {
        let (status, _, body) = t.join().unwrap();
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
    }
}

type Pending = std::thread::JoinHandle<(u16, Vec<(String, String)>, Vec<u8>)>;

/// A server with `serve.queue = 1` and the queue full: a job held at the closed `gate` keeps
/// the worker busy and one more waits (their answers come once the gate opens).
fn full_queue(gate: &Gate) -> (Server, [Pending; 2]) {
    let s = start_gated(&[M, "--set", "serve.queue=1"], gate);
    let port = s.port;
    let job = r#"{"prompt": "a", "steps": 2}"#;
    let running = std::thread::spawn(move || post(port, job));
    wait_metric(port, "runner_jobs_running", &[], 1.0);
    let waiting = std::thread::spawn(move || post(port, job));
    wait_metric(port, "runner_queue_depth", &[], 1.0);
    (s, [running, waiting])
}

fn json_of(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// Polls `GET /v1/jobs/{id}` until `done(job)`.
fn wait_job(port: u16, id: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (status, _, body) = request(port, "GET", &format!("/v1/jobs/{id}"), b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v = json_of(&body);
        if done(&v) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "job never got there: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A metric's value in `GET /metrics`'s text (the sum over label sets matching `labels`).
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| k.split('{').next() == Some(name) && labels.iter().all(|x| k.contains(x)))
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

fn metrics_text(port: u16) -> String {
    let (status, headers, body) = request(port, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").unwrap().starts_with("application/openmetrics-text"), "{headers:?}");
    String::from_utf8(body).unwrap()
}

#[test]
fn serve_runs_asynchronous_jobs() {
    let gate = Gate::new();
    let s = start_gated(&[M], &gate);
    let port = s.port;
    // 202, Location, then the job's state until it succeeds; its image is runner run's.
    let (status, headers, body) = post_to(port, "/v1/jobs", r#"{"prompt": "a dog", "seed": 5, "steps": 3}"#);
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let v = json_of(&body);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(header(&headers, "location"), Some(format!("/v1/jobs/{id}").as_str()));
    assert!(["queued", "running"].contains(&v["state"].as_str().unwrap()), "{v}");
    gate.open();
    let done = wait_job(port, &id, |v| v["state"] == "succeeded");
    assert_eq!((done["seed"].as_u64(), done["images"].as_u64()), (Some(5), Some(1)), "{done}");
    assert_eq!(done["step"], done["steps"], "{done}");
    let (status, headers, png) = request(port, "GET", &format!("/v1/jobs/{id}/image"), b"");
    assert_eq!((status, header(&headers, "content-type")), (200, Some("image/png")));
    assert!(png == runner_run(&["run.prompt=a dog", "run.seed=5", "run.steps=3"]), "the job's PNG is not runner run's");
    let (status, _, body) = request(port, "GET", &format!("/v1/jobs/{id}/image?index=1"), b"");
    assert_eq!((status, error_field(&body)), (404, serde_json::json!("index")));
    // A bad index: the JSON refusal, as every other.
    for q in ["index=x", "index=-1", "index=1.5"] {
        let (status, headers, body) = request(port, "GET", &format!("/v1/jobs/{id}/image?{q}"), b"");
        assert_eq!((status, header(&headers, "content-type")), (400, Some("application/json")), "{q}: {}", String::from_utf8_lossy(&body));
        assert_eq!(error_field(&body), serde_json::json!("index"));
    }

    // Server-sent events: progress while it runs, then `done` with the job. The job is held
    // until the stream has sent its first event, so that it cannot have ended before.
    gate.close();
    let (_, _, body) = post_to(port, "/v1/jobs", r#"{"prompt": "a dog", "steps": 40}"#);
    let id = json_of(&body)["id"].as_str().unwrap().to_string();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(format!("GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut raw = vec![];
    while !String::from_utf8_lossy(&raw).contains("event: progress") {
        let mut buf = [0; 4096];
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before its first event: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    gate.open();
    c.read_to_end(&mut raw).unwrap();
    let (status, headers, body) = parse_response(&raw);
    assert_eq!((status, header(&headers, "content-type")), (200, Some("text/event-stream")));
    let text = String::from_utf8(body).unwrap();
    let events: Vec<(&str, serde_json::Value)> = text
        .split("\n\n")
        .filter_map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect();
    let (last, rest) = events.split_last().unwrap_or_else(|| panic!("no events: {text}"));
    assert_eq!((last.0, &last.1["state"]), ("done", &serde_json::json!("succeeded")), "{text}");
    assert!(!rest.is_empty() && rest.iter().all(|(n, _)| *n == "progress"), "{text}");
    let steps: Vec<u64> = rest.iter().map(|(_, v)| v["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "progress goes forward: {steps:?}");

    // DELETE a running job: cancelled between steps (it may run its first and waits before its
    // second), its image gone (410); the next job runs.
    gate.close();
    gate.allow_step(0);
    let (_, _, body) = post_to(port, "/v1/jobs", r#"{"prompt": "a dog", "steps": 3}"#);
    let id = json_of(&body)["id"].as_str().unwrap().to_string();
    wait_job(port, &id, |v| v["state"] == "running" && v["step"].as_u64() > Some(0));
    let (status, _, body) = request(port, "GET", &format!("/v1/jobs/{id}/image"), b"");
    assert_eq!(status, 409, "not made yet: {}", String::from_utf8_lossy(&body));
    let (status, _, body) = request(port, "DELETE", &format!("/v1/jobs/{id}"), b"");
    let v = json_of(&body);
    assert_eq!((status, v["state"].as_str(), v["step"].as_u64()), (200, Some("cancelled"), Some(1)), "{v}");
    let (status, _, _) = request(port, "GET", &format!("/v1/jobs/{id}/image"), b"");
    assert_eq!(status, 410);
    gate.open();
    let t = Instant::now();
    let (status, _, body) = post(port, r#"{"prompt": "a dog", "steps": 2}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(t.elapsed() < Duration::from_secs(15), "the cancelled job went on: {:?}", t.elapsed());
    // DELETE of an ended job forgets it; unknown ids are 404.
    let (status, _, _) = request(port, "DELETE", &format!("/v1/jobs/{id}"), b"");
    assert_eq!(status, 200);
    for (method, path) in
        [("GET", format!("/v1/jobs/{id}")), ("GET", "/v1/jobs/nope".into()), ("GET", "/v1/jobs/nope/image".into()), ("GET", "/v1/jobs/nope/events".into()), ("DELETE", "/v1/jobs/nope".into())]
    {
        let (status, _, body) = request(port, method, &path, b"");
        assert_eq!(status, 404, "{method} {path}: {}", String::from_utf8_lossy(&body));
    }
    // A bad body is refused before a job exists.
    let (status, _, body) = post_to(port, "/v1/jobs", r#"{"prompt": "a", "stpes": 3}"#);
    assert_eq!((status, error_field(&body)), (422, serde_json::json!("stpes")));

    // Metrics: requests by route and status, jobs by outcome, step and generation latency,
    // the ledger's resident bytes, the queue. (The worker counts a generation just after its
    // answer is sent: wait for the count.)
    wait_metric(port, "runner_generations_total", &["outcome=\"succeeded\""], 3.0);
    let text = metrics_text(port);
    assert_eq!(metric(&text, "runner_http_requests_total", &["path=\"/v1/jobs\"", "status=\"202\""]), 3.0, "{text}");
    assert_eq!(metric(&text, "runner_http_requests_total", &["path=\"/v1/jobs\"", "status=\"422\""]), 1.0, "{text}");
    assert_eq!(metric(&text, "runner_generations_total", &["outcome=\"succeeded\""]), 3.0, "{text}");
    assert_eq!(metric(&text, "runner_generations_total", &["outcome=\"cancelled\""]), 1.0, "{text}");
    assert!(metric(&text, "runner_step_duration_seconds_count", &[]) >= 40.0, "{text}");
    assert_eq!(metric(&text, "runner_generation_duration_seconds_count", &[]), 3.0, "{text}");
    assert!(metric(&text, "runner_device_resident_bytes", &["device=\"cpu\""]) > 0.0, "{text}");
    assert_eq!(metric(&text, "runner_queue_depth", &[]), 0.0, "{text}");
    assert_eq!(metric(&text, "runner_ready", &[]), 1.0, "{text}");
}

fn post_to(port: u16, path: &str, body: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    request(port, "POST", path, body.as_bytes())
}

#[test]
fn serve_answers_504_past_the_deadline() {
    let gate = Gate::new();
    // A deadline far above a 2-step job on a loaded machine (the ungated jobs must finish within
    // it), while the gated ones cannot.
    let s = start_gated(&[M, "--set", "serve.timeout=8", "--set", "serve.schedulers=[\"ddim\", \"pndm\"]"], &gate);
    // `serve.schedulers`: the others are refused, naming the limit; the manifest's needs no key.
    let (status, _, body) = post(s.port, r#"{"prompt": "a", "steps": 2, "scheduler": "euler"}"#);
    assert_eq!((status, error_field(&body)), (422, serde_json::json!("scheduler")));
    assert!(String::from_utf8_lossy(&body).contains("serve.schedulers"));
    gate.open();
    let (status, _, body) = post(s.port, r#"{"prompt": "a", "steps": 2, "scheduler": "ddim"}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // A job held at the gate: 504 when the deadline passes, not before, and at once then.
    gate.close();
    let t = Instant::now();
    let (status, _, body) = post(s.port, r#"{"prompt": "a", "steps": 2}"#);
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("serve.timeout"));
    assert!(t.elapsed() >= Duration::from_secs(8) && t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // An asynchronous job ends `failed` with the same status; the worker is free again.
    let (_, _, body) = post_to(s.port, "/v1/jobs", r#"{"prompt": "a", "steps": 2}"#);
    let id = json_of(&body)["id"].as_str().unwrap().to_string();
    let v = wait_job(s.port, &id, |v| v["state"] == "failed");
    assert_eq!(v["error"]["status"], 504, "{v}");
    gate.open();
    let (status, _, body) = post(s.port, r#"{"prompt": "a", "steps": 2}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn serve_needs_the_bearer_token_when_one_is_set() {
    let token = "s3cret-token";
    let mut child =
        serve_cmd(&[M, "--set", "serve.token_env=RUNNER_TEST_TOKEN", "--listen", "0.0.0.0:0"]).env("RUNNER_TEST_TOKEN", token).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap_or_else(|_| panic!("{line}"));
    let s = Server { child, port };
    // The probes need none; the API and the metrics do.
    let t = Instant::now();
    while request(s.port, "GET", "/readyz", b"").0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(request(s.port, "GET", "/healthz", b"").0, 200);
    for (method, path) in [("POST", "/v1/images"), ("POST", "/v1/jobs"), ("GET", "/metrics"), ("GET", "/v1/jobs/x")] {
        for auth in [vec![], vec!["Authorization: Bearer wrong-token!"], vec!["Authorization: s3cret-token"]] {
            let (status, headers, body) = request_with(s.port, method, path, br#"{"prompt": "a"}"#, &auth);
            assert_eq!(status, 401, "{method} {path} {auth:?}");
            assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"));
            assert!(error_field(&body).is_null());
        }
    }
    let bearer = format!("Authorization: Bearer {token}");
    let (status, _, body) = request_with(s.port, "POST", "/v1/images", br#"{"prompt": "a", "steps": 2}"#, &[&bearer]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The scheme is case-insensitive (RFC 7235).
    for auth in [format!("Authorization: bearer {token}"), format!("Authorization: BEARER  {token}")] {
        assert_eq!(request_with(s.port, "GET", "/metrics", b"", &[&auth]).0, 200, "{auth}");
    }
    assert_eq!(request_with(s.port, "GET", "/metrics", b"", &[&bearer]).0, 200);

    // The variable it names must be set: an error naming it, exit 1.
    let out = serve_cmd(&[M, "--set", "serve.token_env=RUNNER_TEST_NO_SUCH_TOKEN"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RUNNER_TEST_NO_SUCH_TOKEN") && stderr.contains("serve.token_env"), "{stderr}");
    // A token no client could send (a trailing newline, spaces, other than printable ASCII) is
    // refused at start-up, naming the variable and not showing the value.
    for bad in ["s3cret-token\n", " s3cret-token", "s3cret token", "s3crét-token"] {
        let mut cmd = serve_cmd(&[M, "--set", "serve.token_env=RUNNER_TEST_TOKEN", "--listen", "127.0.0.1:0"]);
        cmd.env("RUNNER_TEST_TOKEN", bad);
        let (code, out, err) = exit_within(cmd, 60);
        assert_eq!(code, Some(1), "{bad:?}: {out} {err}");
        assert!(err.contains("RUNNER_TEST_TOKEN") && !err.contains("s3cr"), "{bad:?}: {err}");
    }
    let out = serve_cmd(&[M, "--set", "serve.token_env=\"not a name\""]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_survives_hang_ups_floods_and_slow_clients() {
    let gate = Gate::new();
    let s = start_gated(&[M, "--set", "serve.read_timeout=2"], &gate);
    let port = s.port;
    // A client that disconnects mid-generation (its job held at the gate): its job is cancelled,
    // the worker goes on.
    {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let body = br#"{"prompt": "a", "steps": 2}"#;
        c.write_all(format!("POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes()).unwrap();
        c.write_all(body).unwrap();
        wait_metric(port, "runner_jobs_running", &[], 1.0);
    }
    let t = Instant::now();
    while metric(&metrics_text(port), "runner_generations_total", &["outcome=\"cancelled\""]) < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the job of a client gone was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    gate.open();
    let (status, _, body) = post(port, r#"{"prompt": "a", "steps": 2}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // A body that never ends: 408 after `read_timeout`; a head that never ends: dropped.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut raw = vec![];
    let _ = c.read_to_end(&mut raw);
    assert_eq!(parse_response(&raw).0, 408, "{}", String::from_utf8_lossy(&raw));
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"POST /v1/images HTTP/1.1\r\nHost: x\r\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let t = Instant::now();
    let mut raw = vec![];
    let _ = c.read_to_end(&mut raw);
    assert!(t.elapsed() < Duration::from_secs(15), "a stalled head kept its connection");

    // 1000 requests at a queue of 8: one job held at the gate runs, 8 wait, and every one of
    // 1008 more is a 429 (counted in /metrics); nothing crashes; memory stays flat.
    let rss = |text: &str| metric(text, "runner_process_resident_memory_bytes", &[]);
    let before = rss(&metrics_text(port));
    gate.close();
    let held = r#"{"prompt": "a", "steps": 2}"#;
    let submit = || {
        let (status, _, body) = post_to(port, "/v1/jobs", held);
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
        json_of(&body)["id"].as_str().unwrap().to_string()
    };
    let mut ids = vec![submit()];
    wait_metric(port, "runner_jobs_running", &[], 1.0);
    ids.extend((0..8).map(|_| submit()));
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..16).map(|_| sc.spawn(|| (0..63).map(|_| post(port, r#"{"prompt": "a", "steps": 3}"#).0).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 429), "{statuses:?}");
    let text = metrics_text(port);
    assert_eq!(metric(&text, "runner_http_requests_total", &["path=\"/v1/images\"", "status=\"429\""]), 1008.0);
    assert_eq!(metric(&text, "runner_queue_depth", &[]), 8.0);
    for id in &ids {
        assert_eq!(request(port, "DELETE", &format!("/v1/jobs/{id}"), b"").0, 200);
    }
    gate.open();
    // Then generations, four clients at a time (none refused): images and jobs are not kept.
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4).map(|_| sc.spawn(|| (0..10).map(|_| post(port, r#"{"prompt": "a", "steps": 1}"#).0).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let after = rss(&metrics_text(port));
    assert!(after < before + 64.0 * 1024.0 * 1024.0, "RSS grew from {before} to {after}");
    assert_eq!(request(port, "GET", "/readyz", b"").0, 200);
}

#[test]
fn serve_drains_on_sigterm() {
    let sigterm = |s: &Server| {
        // SAFETY: a signal to our own child process.
        let r = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0);
    };
    // A generation held at the gate when the signal comes finishes once the drain has begun
    // (stderr says so), and is answered; the process exits 0.
    let gate = Gate::new();
    let mut cmd = serve_cmd(&[M]);
    cmd.env("RUNNER_TEST_STEP_GATE", gate.0.path()).stderr(Stdio::piped());
    let mut s = launch(cmd);
    let stderr = BufReader::new(s.child.stderr.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    let port = s.port;
    let running = std::thread::spawn(move || post(port, r#"{"prompt": "a", "steps": 2}"#));
    wait_metric(port, "runner_jobs_running", &[], 1.0);
    sigterm(&s);
    loop {
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("no `draining:` line");
        if line.starts_with("draining: 1 job(s) queued or running") {
            break;
        }
    }
    gate.open();
    let (status, _, body) = running.join().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(s.child.wait().unwrap().code(), Some(0));

    // Past --drain-timeout a job held at the closed gate is cancelled (503), and the process
    // exits 0 soon.
    gate.close();
    let mut s = start_gated(&[M, "--drain-timeout", "0.3"], &gate);
    let port = s.port;
    let running = std::thread::spawn(move || post(port, r#"{"prompt": "a", "steps": 2}"#));
    wait_metric(port, "runner_jobs_running", &[], 1.0);
    let t = Instant::now();
    sigterm(&s);
    let (status, _, body) = running.join().unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("shutting down"));
    assert_eq!(s.child.wait().unwrap().code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Nothing listens any more.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn serve_keeps_the_manifest_it_started_with() {
    // Requests are layered over the text the server loaded: an edit of the file meanwhile
    // changes neither their defaults nor the PNG's manifest digest.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join(M)).unwrap().replace("../tests/fixtures/tiny-sd15", &root().join("tests/fixtures/tiny-sd15").display().to_string());
    let m = dir.path().join("m.toml");
    std::fs::write(&m, &text).unwrap();
    let s = start(&[m.to_str().unwrap()]);
    let (status, _, before) = post(s.port, r#"{"prompt": "a dog", "seed": 2}"#);
    assert_eq!(status, 200);
    std::fs::write(&m, text.replace("steps = 4", "steps = 1")).unwrap();
    let (status, _, after) = post(s.port, r#"{"prompt": "a dog", "seed": 2}"#);
    assert_eq!(status, 200);
    assert!(before == after, "an edit of the manifest file changed a running server's image");
}

#[test]
fn serve_runs_every_kind_like_runner_run() {
    // The kinds' own keys (prompt_2/prompt_3, max_sequence_length, true CFG) pass through; the
    // tiny twins' GPUs simulated on both sides, --locked.
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
    for (manifest, body, sets) in [
        (
            "manifests/tiny-flux-dev.toml",
            r#"{"prompt": "a dog", "prompt_2": "a dog on grass", "negative_prompt": "blurry", "true_cfg_scale": 2.0, "seed": 4, "steps": 2}"#,
            &["run.prompt=a dog", "run.prompt_2=a dog on grass", "run.negative_prompt=blurry", "run.true_cfg_scale=2.0", "run.seed=4", "run.steps=2"][..],
        ),
        (
            "manifests/tiny-sd3.toml",
            r#"{"prompt": "a dog", "prompt_3": "a dog, photo", "max_sequence_length": 8, "seed": 4, "steps": 2}"#,
            &["run.prompt=a dog", "run.prompt_3=a dog, photo", "run.max_sequence_length=8", "run.seed=4", "run.steps=2"][..],
        ),
        ("manifests/tiny-sdxl.toml", r#"{"prompt": "a dog", "prompt_2": "a dog, photo", "seed": 4, "steps": 2}"#, &["run.prompt=a dog", "run.prompt_2=a dog, photo", "run.seed=4", "run.steps=2"][..]),
    ] {
        let s = start(&[manifest, "--locked", "--simulate", sim]);
        let (status, _, png) = post(s.port, body);
        assert_eq!(status, 200, "{manifest}: {}", String::from_utf8_lossy(&png));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.png");
        let mut cmd = runner();
        cmd.args(["run", manifest, "--quiet", "--locked", "--simulate", sim]).arg("--out").arg(&out);
        for set in sets {
            cmd.arg("--set").arg(set);
        }
        let (code, _, stderr) = run(&mut cmd);
        assert_eq!(code, 0, "{stderr}");
        assert!(png == std::fs::read(&out).unwrap(), "{manifest}: served PNG differs from runner run's");
    }
    // A bad --simulate spec names the flag.
    let out = serve_cmd(&[M, "--simulate", "cuda:0=lots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--simulate"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Waits for `child` up to `secs`, killing it then: its exit code (None when killed), stdout and
/// stderr. A server that should have refused to start fails the test instead of hanging it.
fn exit_within(mut cmd: Command, secs: u64) -> (Option<i32>, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (code, out, err)
}

/// `f` on a thread: what it returns, or `None` when it has not within `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

/// A status, headers (lowercased) and body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// [`post`] on a thread: its answer, or `None` when none came within `secs`.
fn post_within(port: u16, body: String, secs: u64) -> Option<Answer> {
    within(secs, move || post(port, &body))
}

/// A PNG's pixels (its metadata left out).
fn pixels(png_bytes: &[u8]) -> Vec<u8> {
    let mut reader = png::Decoder::new(png_bytes).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// A safetensors file of one F32 tensor `name` of `shape`, values from a simple formula.
fn latents_file(name: &str, shape: [u64; 4]) -> Vec<u8> {
    let n: u64 = shape.iter().product();
    let data: Vec<u8> = (0..n).flat_map(|i| (((i * 37 % 101) as f32 / 50.0) - 1.0).to_le_bytes()).collect();
    let header = serde_json::json!({ name: { "dtype": "F32", "shape": shape, "data_offsets": [0, data.len()] } }).to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

#[test]
fn serve_requests_carry_data_not_server_paths() {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut cmd = serve_cmd(&[M]);
    cmd.stderr(Stdio::null());
    let mut s = launch(cmd);
    // A path (a file, a folder, nothing, a FIFO that would block an open()) is refused at once,
    // naming the field, the same answer whatever is there: nothing of the server's files leaks.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut answers = vec![];
    for path in ["/etc/passwd", "/etc/shadow", "/etc", "/no/such/file.safetensors", fifo.to_str().unwrap(), "../tests/fixtures/tiny-sd15/unet/diffusion_pytorch_model.safetensors"] {
        let body = serde_json::json!({"prompt": "a", "steps": 1, "latents": path}).to_string();
        let (status, headers, b) = post_within(s.port, body, 20).unwrap_or_else(|| panic!("`latents` = {path}: no answer within 20 s"));
        assert_eq!((status, header(&headers, "content-type")), (422, Some("application/json")), "{path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(error_field(&b), serde_json::json!("latents"));
        let text = String::from_utf8_lossy(&b).into_owned();
        assert!(text.contains("not paths") && !text.contains("root") && !text.contains("header length") && !text.contains(path), "{text}");
        answers.push(b);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "the answers differ by what the path is");

    // Latents as base64 safetensors data: the image of `runner run` with the same file.
    let data = latents_file("latents", [1, 4, 8, 8]);
    let body = serde_json::json!({"prompt": "a dog", "steps": 2, "latents": b64(&data)}).to_string();
    let (status, _, png) = post(s.port, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    let file = dir.path().join("l.safetensors");
    std::fs::write(&file, &data).unwrap();
    let want = runner_run(&["run.prompt=a dog", "run.steps=2", &format!("run.latents={}", file.display())]);
    assert!(pixels(&png) == pixels(&want), "served latents give another image than runner run's file");
    // Checked whole before the job queues: the shape, the tensors, the dtype, base64 itself.
    let mut wrong_dtype = data.clone();
    let at = wrong_dtype.windows(5).position(|w| w == b"\"F32\"").unwrap();
    wrong_dtype[at + 1..at + 4].copy_from_slice(b"I32");
    let two = {
        let mut f = latents_file("a", [1, 4, 8, 8]);
        f.truncate(8);
        let header = serde_json::json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).to_string();
        f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(&[0; 8]);
        f
    };
    for (latents, needle) in [
        (serde_json::json!(b64(&latents_file("latents", [1, 4, 16, 8]))), "shape"),
        (serde_json::json!(b64(&wrong_dtype)), "F32"),
        (serde_json::json!(b64(&two)), "2 tensors"),
        (serde_json::json!(b64(b"root:x:0:0:root:/root:/bin/bash\n")), "safetensors"),
        (serde_json::json!("not base64!"), "base64"),
        (serde_json::json!([1, 2]), "base64"),
    ] {
        let body = serde_json::json!({"prompt": "a", "steps": 1, "latents": latents}).to_string();
        let (status, _, b) = post(s.port, &body);
        assert_eq!((status, error_field(&b)), (422, serde_json::json!("latents")), "{}", String::from_utf8_lossy(&b));
        assert!(String::from_utf8_lossy(&b).contains(needle), "{needle}: {}", String::from_utf8_lossy(&b));
    }
    // Output names stay refused (the server sends the image; it writes no file).
    let (status, _, b) = post(s.port, r#"{"prompt": "a", "output": "/tmp/x.png"}"#);
    assert_eq!((status, error_field(&b)), (422, serde_json::json!("output")));

    // No thread is left blocked in an open(): SIGTERM drains and exits at once.
    // SAFETY: a signal to our own child process.
    assert_eq!(unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the server did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `manifests/tiny-sd15.toml` in a temporary folder, its pipeline folder absolute, with `edit`.
fn tiny_manifest(edit: impl Fn(String) -> String) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join(M)).unwrap().replace("../tests/fixtures/tiny-sd15", &root().join("tests/fixtures/tiny-sd15").display().to_string());
    let m = dir.path().join("m.toml");
    std::fs::write(&m, edit(text)).unwrap();
    let m = m.to_str().unwrap().to_string();
    (dir, m)
}

#[test]
fn serve_limits_hold_the_values_a_job_runs_with() {
    // Width and height left to the model's default (64x64 from the tiny UNet's sample_size and
    // the VAE's factor): a request naming only one is held against the other's default.
    let (_d, m) = tiny_manifest(|t| t.replace("width = 64\n", "").replace("height = 64\n", ""));
    let s = start(&[&m, "--set", "serve.max_pixels=4096", "--set", "serve.max_batch=2"]);
    for (body, field) in [(r#"{"prompt": "a", "steps": 1, "height": 128}"#, "height"), (r#"{"prompt": "a", "steps": 1, "width": 128}"#, "width")] {
        let (status, _, b) = post(s.port, body);
        assert_eq!((status, error_field(&b)), (422, serde_json::json!(field)), "{body}: {}", String::from_utf8_lossy(&b));
        assert!(String::from_utf8_lossy(&b).contains("serve.max_pixels"));
    }
    let (status, _, b) = post(s.port, r#"{"prompt": "a", "steps": 1, "batch": 3, "response": "json"}"#);
    assert_eq!((status, error_field(&b)), (422, serde_json::json!("batch")));
    let (status, _, b) = post(s.port, r#"{"prompt": "a", "steps": 1}"#);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    drop(s);

    // A manifest whose own job (defaults included) is over a limit is refused before listening,
    // naming the key: steps left to the kind's 50, the default size, a batch.
    let (_d, no_steps) = tiny_manifest(|t| t.replace("steps = 4\n", ""));
    let (_d2, no_size) = tiny_manifest(|t| t.replace("width = 64\n", "").replace("height = 64\n", ""));
    for (manifest, sets, needles) in [
        (&no_steps, ["--set", "serve.max_steps=2"], ["`run.steps`", "serve.max_steps", "50"]),
        (&no_size, ["--set", "serve.max_pixels=2048"], ["`run.width`", "serve.max_pixels", "64x64"]),
        (&m, ["--set", "run.batch=3"], ["`run.batch`", "serve.max_batch", "3"]),
    ] {
        let mut args = vec![manifest.as_str()];
        args.extend(sets);
        if manifest == &m {
            args.extend(["--set", "serve.max_batch=2"]);
        }
        args.extend(["--listen", "127.0.0.1:0"]);
        let (code, out, err) = exit_within(serve_cmd(&args), 60);
        assert_eq!(code, Some(1), "{args:?}: {out} {err}");
        assert!(out.is_empty(), "it listened: {out}");
        assert!(needles.iter().all(|n| err.contains(n)), "{needles:?}: {err}");
    }
}

#[test]
fn serve_metrics_labels_are_bounded() {
    let s = start(&[M]);
    for i in 0..40 {
        let (status, _, _) = request(s.port, &format!("INVENTED{i}"), "/healthz", b"");
        assert_eq!(status, 405);
    }
    let (status, _, _) = request(s.port, "PATCH", "/healthz", b"");
    assert_eq!(status, 405);
    let text = metrics_text(s.port);
    assert!(!text.contains("INVENTED"), "{text}");
    assert_eq!(metric(&text, "runner_http_requests_total", &["path=\"/healthz\"", "method=\"other\""]), 40.0, "{text}");
    assert_eq!(metric(&text, "runner_http_requests_total", &["path=\"/healthz\"", "method=\"PATCH\""]), 1.0, "{text}");
}

/// The process's user and system CPU time, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn serve_backs_off_when_it_runs_out_of_file_descriptors() {
    let mut cmd = serve_cmd(&[M]);
    cmd.stderr(Stdio::piped());
    let mut s = launch(cmd);
    let pid = s.child.id();
    // The server's descriptor limit lowered to what it holds now, plus a few: connections beyond
    // those fail its accept() with EMFILE.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let limit = libc::rlimit { rlim_cur: open + 4, rlim_max: open + 4 };
    // SAFETY: prlimit on our own child with a valid struct.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) }, 0);
    let held: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(("127.0.0.1", s.port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(pid) - before;
    eprintln!("CPU ticks over 1 s while accept() failed: {spent}");
    // A spin takes about 100 ticks a second; backing off, a few.
    assert!(spent < 15, "the server spent {spent} ticks of CPU in 1 s while accept() failed");
    drop(held);
    // Once descriptors are free again it serves.
    let port = s.port;
    let answered = within(20, move || request(port, "GET", "/healthz", b"").0);
    assert_eq!(answered, Some(200), "the server did not serve again");
    let _ = s.child.kill();
    let _ = s.child.wait();
    let mut err = String::new();
    s.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(err.matches("cannot accept connections").count(), 1, "said once per episode: {err}");
}

/// Live adapters (`fuse = false`) change scale per request (`"adapter_scales"`), with no reload:
/// each answer is `runner run`'s image at that scale; an undeclared adapter is a 422 naming the field.
#[test]
fn serve_changes_live_adapter_scales_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.toml");
    let text = std::fs::read_to_string(root().join(M)).unwrap().replace("source = \"../tests/fixtures/tiny-sd15\"", &format!("source = \"{}\"", root().join("tests/fixtures/tiny-sd15").display()));
    std::fs::write(&m, format!("{text}\n[adapters.style]\nsource = \"{}\"\nfuse = false\nscale = 0.8\n", root().join("tests/fixtures/loras/sd15-peft.safetensors").display())).unwrap();
    let m = m.to_str().unwrap().to_string();
    let base = ["serve.max_steps=3", "run.steps=2"];
    let s = start(&[&m, "--set", base[0], "--set", base[1]]);
    let pixels = |png: &[u8]| {
        let p = dir.path().join("p.png");
        std::fs::write(&p, png).unwrap();
        crate::util::decode_png(&p).0
    };
    let run_at = |scale: Option<&str>| {
        let out = dir.path().join("r.png");
        let mut cmd = runner();
        cmd.args(["run", &m, "--quiet", "--set", base[0], "--set", base[1], "--set", "run.prompt=a dog", "--set", "run.seed=3"]).arg("--out").arg(&out);
        if let Some(s) = scale {
            cmd.args(["--set", &format!("run.adapter_scales={{style={s}}}")]);
        }
        let (code, _, stderr) = run(&mut cmd);
        assert_eq!(code, 0, "{stderr}");
        crate::util::decode_png(&out).0
    };
    let mut seen = vec![];
    for (body, scale) in [
        (r#"{"prompt": "a dog", "seed": 3}"#, None),
        (r#"{"prompt": "a dog", "seed": 3, "adapter_scales": {"style": 0.2}}"#, Some("0.2")),
        (r#"{"prompt": "a dog", "seed": 3, "adapter_scales": {"style": 1.5}}"#, Some("1.5")),
    ] {
        let (status, _, png) = post(s.port, body);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
        let got = pixels(&png);
        assert!(got == run_at(scale), "{body}: differs from runner run");
        seen.push(got);
    }
    assert!(seen[0] != seen[1] && seen[1] != seen[2], "the scale changes the image");
    let (status, _, body) = post(s.port, r#"{"prompt": "a dog", "adapter_scales": {"other": 0.5}}"#);
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("no adapter `other`"), "{}", String::from_utf8_lossy(&body));
}

/// Image-to-image over HTTP: `image` is a PNG's bytes in base64 (never a path); the PNG equals
/// `runner run` with that file as `run.image`; bad data is a 422 naming the field.
#[test]
fn serve_takes_images_as_base64_data() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.toml");
    let text = std::fs::read_to_string(root().join(M)).unwrap().replace("source = \"../tests/fixtures/tiny-sd15\"", &format!("source = \"{}\"", root().join("tests/fixtures/tiny-sd15").display()));
    std::fs::write(&m, text).unwrap();
    let m = m.to_str().unwrap().to_string();
    let base = ["serve.max_steps=4", "run.steps=4"];
    let s = start(&[&m, "--set", base[0], "--set", base[1]]);
    let input = root().join("tests/fixtures/images/init-rgb-70x52.png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&input).unwrap());
    let (status, _, png) = post(s.port, &format!(r#"{{"prompt": "a dog", "seed": 3, "strength": 0.5, "image": "{b64}"}}"#));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    let p = dir.path().join("p.png");
    std::fs::write(&p, &png).unwrap();
    let (got, text) = crate::util::decode_png(&p);
    let out = dir.path().join("r.png");
    let (code, _, stderr) = run(runner()
        .args(["run", &m, "--quiet", "--set", base[0], "--set", base[1], "--set", "run.prompt=a dog", "--set", "run.seed=3", "--set", "run.strength=0.5", "--set"])
        .arg(format!("run.image={}", input.display()))
        .arg("--out")
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    assert!(got == crate::util::decode_png(&out).0, "differs from runner run");
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.contains("Denoising strength: 0.5")), "{text:?}");
    // Inpainting: the mask as data too.
    let mask_file = root().join("tests/fixtures/images/mask-50x40.png");
    let mask = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&mask_file).unwrap());
    let (status, _, png) = post(s.port, &format!(r#"{{"prompt": "a dog", "seed": 3, "image": "{b64}", "mask_image": "{mask}"}}"#));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    std::fs::write(&p, &png).unwrap();
    let (got, _) = crate::util::decode_png(&p);
    let (code, _, stderr) = run(runner()
        .args(["run", &m, "--quiet", "--set", base[0], "--set", base[1], "--set", "run.prompt=a dog", "--set", "run.seed=3", "--set"])
        .arg(format!("run.image={}", input.display()))
        .arg("--set")
        .arg(format!("run.mask_image={}", mask_file.display()))
        .arg("--out")
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    assert!(got == crate::util::decode_png(&out).0, "inpainting: differs from runner run");
    for (body, field, words) in [
        (r#"{"prompt": "a", "image": "/etc/passwd"}"#.to_string(), "image", "not paths"),
        (r#"{"prompt": "a", "image": "%%%% not base64 %%%%"}"#.to_string(), "image", "base64"),
        (format!(r#"{{"prompt": "a", "image": "{}"}}"#, base64::engine::general_purpose::STANDARD.encode(b"this is not an image file at all")), "image", "PNG, JPEG or WebP"),
        (format!(r#"{{"prompt": "a", "mask_image": "{b64}"}}"#), "mask_image", "without `image`"),
        (format!(r#"{{"prompt": "a", "image": "{b64}", "strength": 2}}"#), "strength", "(0, 1]"),
    ] {
        let (status, _, resp) = post(s.port, &body);
        assert_eq!(status, 422, "{field}: {}", String::from_utf8_lossy(&resp));
        let e = error_field(&resp);
        assert_eq!(e, field, "{}", String::from_utf8_lossy(&resp));
        assert!(String::from_utf8_lossy(&resp).contains(words), "{words}: {}", String::from_utf8_lossy(&resp));
    }
}

/// The Python of the test venv (scripts/setup-deploy-check.sh), when it has `module`.
fn test_python(module: &str) -> Option<std::path::PathBuf> {
    let py = root().join(".venv-deploy/bin/python");
    let ok = py.exists() && Command::new(&py).args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: no `{module}` in .venv-deploy (run scripts/setup-deploy-check.sh)");
    }
    ok.then_some(py)
}

#[test]
fn the_official_openai_client_works_unchanged() {
    let Some(py) = test_python("openai") else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = ["serve.max_steps=3", "run.steps=3", "serve.max_batch=2", "serve.token_env=RUNNER_TEST_TOKEN"];
    let mut args = vec![M];
    for s in &base {
        args.extend(["--set", s]);
    }
    let mut cmd = serve_cmd(&args);
    cmd.env("RUNNER_TEST_TOKEN", "sk-test");
    let s = launch(cmd);
    let o = Command::new(&py).arg(root().join("tests/support/openai_client.py")).args([&s.port.to_string(), "sk-test", "tiny-sd15"]).arg(dir.path()).arg("generate").output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{said}");
    // The images are `runner run`'s with the same settings, byte for byte.
    let sets = ["run.prompt=a dog", "run.seed=3", "run.steps=2", "run.negative_prompt=blurry", "run.width=64", "run.height=64"];
    let batch = {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.png");
        let mut cmd = runner();
        cmd.args(["run", M, "--quiet", "--set", "run.batch=2"]).arg("--out").arg(&out);
        for s in base.iter().chain(&sets) {
            cmd.arg("--set").arg(s);
        }
        let (code, _, stderr) = run(&mut cmd);
        assert_eq!(code, 0, "{stderr}");
        [std::fs::read(d.path().join("x-0.png")).unwrap(), std::fs::read(d.path().join("x-1.png")).unwrap()]
    };
    for (i, want) in batch.iter().enumerate() {
        assert!(std::fs::read(dir.path().join(format!("b64-{i}.png"))).unwrap() == *want, "image {i} of n=2 differs from runner run's");
    }
    let one: Vec<&str> = base.iter().chain(&sets).copied().collect();
    assert!(std::fs::read(dir.path().join("url.png")).unwrap() == runner_run(&one), "the url image differs from runner run's");
}

#[test]
fn the_openai_client_sees_a_full_queue_as_a_rate_limit() {
    let Some(py) = test_python("openai") else { return };
    let gate = Gate::new();
    let (s, held) = full_queue(&gate);
    let o = Command::new(&py).arg(root().join("tests/support/openai_client.py")).args([&s.port.to_string(), "none", "tiny-sd15", "/tmp", "ratelimit"]).output().unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    gate.open();
    for t in held {
        assert_eq!(t.join().unwrap().0, 200);
    }
}

#[test]
fn openai_errors_come_in_openai_shape() {
    let s = start(&[M, "--set", "serve.max_steps=3", "--set", "run.steps=3", "--set", "serve.max_batch=2", "--set", "serve.max_pixels=4096"]);
    let openai = |body: &str| {
        let (status, headers, b) = post_to(s.port, "/v1/images/generations", body);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_else(|_| panic!("{body}: {}", String::from_utf8_lossy(&b)));
        (status, headers, v)
    };
    for (body, status, param) in [
        (r#"{"prompt": "a", "size": "0x0"}"#, 400, "size"),
        (r#"{"prompt": "a", "size": "64"}"#, 400, "size"),
        (r#"{"prompt": "a", "size": "64x64x64"}"#, 400, "size"),
        (r#"{"prompt": "a", "size": "-64x64"}"#, 400, "size"),
        (r#"{"prompt": "a", "size": "60x64"}"#, 400, "size"),
        (r#"{"prompt": "a", "size": "1024x1024", "steps": 1}"#, 400, "size"),
        (r#"{"prompt": "a", "n": 0}"#, 400, "n"),
        (r#"{"prompt": "a", "n": 3, "size": "64x64"}"#, 400, "n"),
        (r#"{"prompt": "a", "response_format": "gif"}"#, 400, "response_format"),
        (r#"{"prompt": "a", "steps": 9, "size": "64x64"}"#, 400, "steps"),
        (r#"{"prompt": "a", "model": "dall-e-3"}"#, 404, "model"),
        (r#"{"size": "64x64"}"#, 400, "prompt"),
    ] {
        let (got, _, v) = openai(body);
        assert_eq!(got, status, "{body}: {}", &v.to_string()[..v.to_string().len().min(300)]);
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"] == "invalid_request_error", "{body}: {v}");
    }
    // OpenAI's own parameters runner has no use for are accepted, and said.
    let (status, headers, v) = openai(r#"{"prompt": "a", "size": "64x64", "quality": "hd", "style": "vivid", "user": "u1", "steps": 1, "model": "tiny-sd15"}"#);
    assert_eq!(status, 200, "{v}");
    assert!(header(&headers, "x-runner-warning").is_some_and(|w| w.contains("quality") && w.contains("style")), "{headers:?}");
    assert!(v["data"][0]["b64_json"].as_str().is_some_and(|b| b.len() > 100) && v["created"].as_u64().is_some(), "{v}");
    // A body over the limit: 413 in the same shape.
    let (status, _, v) = openai(&format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5 << 20)));
    assert_eq!((status, v["error"]["code"].as_str()), (413, Some("request_too_large")), "{v}");
    // An unknown URL id is a 404 in the same shape.
    let (status, _, b) = request(s.port, "GET", "/v1/images/files/0123.png", b"");
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&b));
}

/// Chromium and its driver (Debian's `chromium` and `chromium-driver`), when installed.
fn chromium() -> Option<()> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromedriver"].iter().all(|p| std::path::Path::new(p).exists());
    if !found {
        eprintln!("skipped: the browser test needs Debian's chromium and chromium-driver (scripts/setup-deploy-check.sh installs them where apt-get works)");
    }
    found.then_some(())
}

#[test]
fn the_page_generates_in_a_real_browser() {
    let (Some(py), Some(())) = (test_python("selenium"), chromium()) else { return };
    let gate = Gate::new();
    let base = ["serve.max_steps=3", "run.steps=3", "serve.token_env=RUNNER_TEST_TOKEN"];
    let mut args = vec![M];
    for s in &base {
        args.extend(["--set", s]);
    }
    let mut cmd = serve_cmd(&args);
    cmd.env("RUNNER_TEST_TOKEN", "page-token").env("RUNNER_TEST_STEP_GATE", gate.0.path());
    let s = launch(cmd);
    let dir = tempfile::tempdir().unwrap();
    // The README's screenshot is refreshed with RUNNER_SCREENSHOT=docs/serve-page.png.
    let shot = std::env::var("RUNNER_SCREENSHOT").ok().map(|p| root().join(p));
    let mut c = Command::new(&py);
    c.arg(root().join("tests/support/browser_check.py")).args([&s.port.to_string(), "page-token"]).arg(gate.0.path()).arg(dir.path());
    if let Some(p) = &shot {
        c.arg(p);
    }
    let o = c.output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{said}");
    eprintln!("{said}");
    let prompt = r#"a <img src=x onerror="window.__xss = 1"> cat <script>window.__xss = 2</script>"#;
    let prompt_set = format!("run.prompt={prompt}");
    let mut sets: Vec<&str> = base.to_vec();
    sets.extend([prompt_set.as_str(), "run.negative_prompt=blurry", "run.width=64", "run.height=64", "run.steps=3", "run.guidance_scale=5", "run.seed=7"]);
    let png = std::fs::read(dir.path().join("page.png")).unwrap();
    assert!(png == runner_run(&sets), "the PNG the page downloads differs from runner run's");
}
