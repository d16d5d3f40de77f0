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

fn serve_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("runner"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RUNNER_") {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(root()).env("NO_COLOR", "1").env("OMP_NUM_THREADS", "1").env_remove("RUST_LOG").arg("serve").args(args);
    cmd
}

/// Starts `runner serve ARGS --listen 127.0.0.1:0`, reads the bound port from its first line
/// and waits for `/readyz`.
fn start(args: &[&str]) -> Server {
    let mut child = serve_cmd(args).args(["--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawns");
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
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // A body over the limit may be refused before it is read: the answer counts, not the write.
    let _ = s.write_all(body);
    let mut raw = vec![];
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    (status, headers, raw[split + 4..].to_vec())
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
    let base = ["serve.max_steps=3", "run.guidance_scale=5.0"];
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
    let want = runner_run(&[base[0], base[1], "run.prompt=a dog", "run.seed=3", "run.steps=2", "run.negative_prompt=blurry"]);
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

    // 422 naming the field: unknown, wrong type, missing prompt, over a limit; malformed JSON.
    for (body, field) in [
        (r#"{"prompt": "a", "sed": 3}"#, serde_json::json!("sed")),
        (r#"{"prompt": "a", "steps": "many"}"#, serde_json::json!("steps")),
        (r#"{"prompt": "a", "seed": -1}"#, serde_json::json!("seed")),
        (r#"{"seed": 1}"#, serde_json::json!("prompt")),
        (r#"{"prompt": "a", "steps": 4}"#, serde_json::json!("steps")),
        (r#"{"prompt": "a", "response": "gif"}"#, serde_json::json!("response")),
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

    // 413: a body over the limit.
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2 << 20));
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
    assert!(stderr.contains("--insecure-bind"), "{stderr}");
    let out = serve_cmd(&[M, "--listen", "localhost"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen localhost"));
}

#[test]
fn serve_answers_429_when_the_queue_is_full() {
    let s = start(&[M, "--set", "serve.queue=1"]);
    let port = s.port;
    // A long job keeps the worker busy; one more waits; the next is refused.
    let slow = r#"{"prompt": "a", "steps": 400}"#;
    let _running = std::thread::spawn(move || post(port, slow));
    std::thread::sleep(Duration::from_millis(300));
    let _waiting = std::thread::spawn(move || post(port, slow));
    std::thread::sleep(Duration::from_millis(300));
    let (status, headers, body) = post(port, slow);
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(error_field(&body), serde_json::Value::Null);
}
