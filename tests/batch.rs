//! `runner run --prompts FILE.jsonl`: one loaded pipeline, one line's overrides after the other;
//! each image equal to `runner run` with the same `--set` flags; bad lines, resumes, templates.

use std::path::Path;

use crate::util::{decode_png as png, run, runner};

const M: &str = "manifests/tiny-sd15.toml";

fn records(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn each_line_equals_runner_run_with_the_same_overrides() {
    let dir = tempfile::tempdir().unwrap();
    // The second line changes the shape (and the batch), the third the guidance, prompt and
    // scheduler.
    let p = write(
        dir.path(),
        "{\"prompt\": \"a dog\", \"seed\": 3, \"steps\": 2}\n{\"seed\": 4, \"steps\": 2, \"width\": 32, \"height\": 48, \"batch\": 2}\n{\"prompt\": \"caf\u{e9} \\\"x\\\"\", \"negative_prompt\": \"blurry\", \"seed\": 5, \"steps\": 3, \"guidance_scale\": 5.0, \"scheduler\": \"ddim\"}\n",
    );
    let tpl = dir.path().join("b/{name}-{index:02}-{seed}.png");
    let (code, stdout, stderr) = run(runner().args(["run", M, "--quiet", "--json", "--set", "run.steps=1", "--prompts"]).arg(&p).arg("--out").arg(&tpl));
    assert_eq!(code, 0, "{stderr}");
    let recs = records(&stdout);
    assert_eq!(recs.len(), 3, "{stdout}");
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{stdout}");
    assert_eq!((recs[1]["index"].as_u64(), recs[1]["line"].as_u64(), recs[1]["seed"].as_u64()), (Some(1), Some(2), Some(4)));
    assert_eq!((recs[1]["width"].as_u64(), recs[1]["height"].as_u64()), (Some(32), Some(48)));
    let b = dir.path().join("b");
    assert_eq!(files(&b), ["tiny-sd15-00-3.png", "tiny-sd15-01-4-0.png", "tiny-sd15-01-4-1.png", "tiny-sd15-02-5.png"]);
    let same = |sets: &[&str], out: &str, ours: &[&str]| {
        let mut cmd = runner();
        cmd.args(["run", M, "--quiet", "--set", "run.steps=1"]);
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let (code, _, stderr) = run(cmd.arg("--out").arg(dir.path().join(out)));
        assert_eq!(code, 0, "{stderr}");
        let theirs: Vec<_> = if ours.len() == 1 { vec![dir.path().join(out)] } else { (0..ours.len()).map(|i| dir.path().join(out.replace(".png", &format!("-{i}.png")))).collect() };
        for (o, t) in ours.iter().zip(theirs) {
            assert_eq!(png(&b.join(o)), png(&t), "{o}: pixels and every text chunk (runner metadata, manifest digest) equal");
        }
    };
    same(&["run.prompt=a dog", "run.seed=3", "run.steps=2"], "r0.png", &["tiny-sd15-00-3.png"]);
    same(&["run.seed=4", "run.steps=2", "run.width=32", "run.height=48", "run.batch=2"], "r1.png", &["tiny-sd15-01-4-0.png", "tiny-sd15-01-4-1.png"]);
    same(&["run.prompt=caf\u{e9} \"x\"", "run.negative_prompt=blurry", "run.seed=5", "run.steps=3", "run.guidance_scale=5.0", "pipeline.scheduler=ddim"], "r2.png", &["tiny-sd15-02-5.png"]);
}

#[test]
fn bad_lines_are_reported_and_the_others_generated() {
    let dir = tempfile::tempdir().unwrap();
    let text = [
        r#"{"seed": 1}"#,
        "",
        r#"{"seed": 2, "promt": "x"}"#,
        r#"{"seed": 3"#,
        r#"{"seed": 4, "steps": -2}"#,
        r#"{"seed": 5, "steps": "ten"}"#,
        r#"{"seed": 6, "width": 60}"#,
        r#"{"seed": 7, "dtype": "fp16"}"#,
        r#"["a cat"]"#,
        r#"{"seed": 8, "width": 4096, "height": 4096}"#,
        r#"{"prompt": "no seed"}"#,
    ]
    .join("\n");
    let p = write(dir.path(), &text);
    let tpl = dir.path().join("{line:02}.png");
    let (code, stdout, stderr) = run(runner().args(["run", M, "--quiet", "--json", "--set", "run.steps=1", "--prompts"]).arg(&p).arg("--out").arg(&tpl));
    assert_eq!(code, 1, "a failed line fails the batch: {stderr}");
    let recs = records(&stdout);
    let status: Vec<(u64, &str)> = recs.iter().map(|r| (r["line"].as_u64().unwrap(), r["status"].as_str().unwrap())).collect();
    assert_eq!(status, [(1, "ok"), (3, "error"), (4, "error"), (5, "error"), (6, "error"), (7, "error"), (8, "error"), (9, "error"), (10, "error"), (11, "ok")]);
    let err = |line: u64| recs.iter().find(|r| r["line"] == line).unwrap()["error"].as_str().unwrap().to_string();
    assert!(err(3).contains("unknown key `promt`") && err(3).contains("did you mean `prompt`"), "{}", err(3));
    assert!(err(4).contains("not valid JSON"), "{}", err(4));
    assert!(err(5).contains("`run.steps` must be at least 1"), "{}", err(5));
    assert!(err(6).contains("run.steps"), "{}", err(6));
    assert!(err(7).contains("multiple of 8"), "{}", err(7));
    assert!(err(8).contains("unknown key `dtype`") && err(8).contains("[pipeline]"), "{}", err(8));
    assert!(err(9).contains("JSON object"), "{}", err(9));
    assert!(err(10).contains("working memory does not fit the budgets"), "{}", err(10));
    // A line without a seed gets one drawn, reported and named.
    let drawn = recs.last().unwrap()["seed"].as_u64().unwrap();
    let (_, meta) = png(&dir.path().join("11.png"));
    assert!(meta.iter().any(|(k, v)| k == "runner" && v.contains(&format!("\"seed\":{drawn}"))), "{meta:?}");
    assert_eq!(files(dir.path()), ["01.png", "11.png", "prompts.jsonl"]);
    // For people: each error names its line number.
    std::fs::remove_file(dir.path().join("01.png")).unwrap();
    std::fs::remove_file(dir.path().join("11.png")).unwrap();
    let (code, stdout, stderr) = run(runner().args(["run", M, "--quiet", "--set", "run.steps=1", "--prompts"]).arg(&p).arg("--out").arg(&tpl));
    assert_eq!(code, 1);
    assert!(stderr.contains("error: line 3: unknown key `promt`") && stderr.contains("batch: 2 generated, 0 skipped, 8 failed"), "{stderr}");
    assert!(stdout.contains("line 1: wrote "), "{stdout}");
}

#[test]
fn a_killed_batch_resumes_with_skip_existing() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "{\"seed\": 1}\n{\"seed\": 2}\n{\"seed\": 3}\n");
    let tpl = dir.path().join("{index}.png");
    let args = |extra: &[&str]| {
        let mut c = runner();
        c.args(["run", M, "--quiet", "--json", "--set", "run.steps=1", "--prompts"]).arg(&p).arg("--out").arg(&tpl).args(extra);
        c
    };
    // What a kill leaves: the first two images written, the third's temp file half-written by a
    // process that is gone.
    std::fs::write(dir.path().join("0.png"), b"done before the kill").unwrap();
    std::fs::write(dir.path().join("1.png"), b"done before the kill").unwrap();
    let dead = 4_194_303; // above any pid_max in use
    std::fs::write(dir.path().join(format!(".2.png.runner-tmp-{dead}")), b"half").unwrap();
    // And one beside a finished image (a `--force` run killed while replacing it).
    std::fs::write(dir.path().join(format!(".0.png.runner-tmp-{dead}")), b"half").unwrap();

    // Neither flag: refused before anything is generated, nothing replaced.
    let (code, stdout, stderr) = run(&mut args(&[]));
    assert_eq!(code, 1);
    assert!(stderr.contains("2 of the batch's images exist already") && stderr.contains("--skip-existing") && stderr.contains("--force"), "{stderr}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["error"]["message"].is_string(), "{stdout}");
    assert!(!dir.path().join("2.png").exists());

    let (code, stdout, stderr) = run(&mut args(&["--skip-existing"]));
    assert_eq!(code, 0, "{stderr}");
    let status: Vec<String> = records(&stdout).iter().map(|r| r["status"].as_str().unwrap().to_string()).collect();
    assert_eq!(status, ["skipped", "skipped", "ok"]);
    assert_eq!(std::fs::read(dir.path().join("0.png")).unwrap(), b"done before the kill", "not generated twice");
    assert_eq!(std::fs::read(dir.path().join("1.png")).unwrap(), b"done before the kill");
    assert_eq!(files(dir.path()), ["0.png", "1.png", "2.png", "prompts.jsonl"], "the leftover temp file is gone");
    let (code, stdout, _) = run(&mut args(&["--skip-existing"]));
    assert_eq!(code, 0);
    assert!(records(&stdout).iter().all(|r| r["status"] == "skipped"), "nothing to do: nothing loaded or written");

    // --force replaces them.
    let (code, stdout, stderr) = run(&mut args(&["--force"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(records(&stdout).iter().all(|r| r["status"] == "ok"));
    assert_ne!(std::fs::read(dir.path().join("0.png")).unwrap(), b"done before the kill");
}

#[test]
fn bad_templates_and_files_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "{\"seed\": 1}\n{\"seed\": 2}\n");
    // The pipeline folder is gone: anything reaching the load would say so instead.
    let broken = ["--set", "pipeline.source=/nonexistent"];
    let (code, _, stderr) = run(runner().args(["run", M, "--quiet"]).args(broken).arg("--prompts").arg(&p).arg("--out").arg(dir.path().join("{idx}-{index}.png")));
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown placeholder `{idx}`"), "{stderr}");
    let (code, _, stderr) = run(runner().args(["run", M, "--quiet", "--json"]).args(broken).arg("--prompts").arg(dir.path().join("missing.jsonl")));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read the prompts file") && stderr.contains("missing.jsonl"), "{stderr}");
    // Two lines, one name.
    std::fs::write(dir.path().join("p2.jsonl"), "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let (code, _, stderr) = run(runner().args(["run", M, "--quiet", "--set", "run.seed=1", "--prompts"]).arg(dir.path().join("p2.jsonl")).arg("--out").arg(dir.path().join("{seed}.png")));
    assert_eq!(code, 1);
    assert!(stderr.contains("would write") && stderr.contains("{index}"), "{stderr}");
    assert_eq!(files(dir.path()), ["p2.jsonl", "prompts.jsonl"], "nothing written");
    // --skip-existing and --force without --prompts, or together: refused by the parser.
    assert_eq!(run(runner().args(["run", M, "--skip-existing"])).0, 2);
    assert_eq!(run(runner().args(["run", M, "--force", "--skip-existing"]).arg("--prompts").arg(&p)).0, 2);
}

#[test]
fn shards_together_make_the_unsharded_batch() {
    let dir = tempfile::tempdir().unwrap();
    // An empty line in the middle: {index} counts non-empty lines, in every shard alike.
    let p = write(dir.path(), "{\"seed\": 1}\n{\"seed\": 2}\n\n{\"seed\": 3, \"prompt\": \"a fox\"}\n{\"seed\": 4}\n{\"seed\": 5}\n");
    let batch = |out: &str, shard: Option<&str>| {
        let mut c = runner();
        c.args(["run", M, "--quiet", "--json", "--set", "run.steps=1", "--set", "run.width=32", "--set", "run.height=32", "--prompts"])
            .arg(&p)
            .arg("--out")
            .arg(dir.path().join(out).join("{index:02}-{seed}.png"));
        if let Some(s) = shard {
            c.args(["--shard", s]);
        }
        let (code, stdout, stderr) = run(&mut c);
        assert_eq!(code, 0, "{stderr}");
        records(&stdout).iter().map(|r| (r["index"].as_u64().unwrap(), r["line"].as_u64().unwrap(), r["status"].as_str().unwrap().to_string())).collect::<Vec<_>>()
    };
    let ok = |v: &[(u64, u64)]| v.iter().map(|&(i, l)| (i, l, "ok".to_string())).collect::<Vec<_>>();
    assert_eq!(batch("all", None), ok(&[(0, 1), (1, 2), (2, 4), (3, 5), (4, 6)]));
    // The other shard's lines are left out of the report, not skipped.
    assert_eq!(batch("sharded", Some("0/2")), ok(&[(0, 1), (2, 4), (4, 6)]));
    assert_eq!(batch("sharded", Some("1/2")), ok(&[(1, 2), (3, 5)]));
    let (all, sharded) = (dir.path().join("all"), dir.path().join("sharded"));
    assert_eq!(files(&all), ["00-1.png", "01-2.png", "02-3.png", "03-4.png", "04-5.png"]);
    assert_eq!(files(&sharded), files(&all));
    for f in files(&all) {
        assert!(std::fs::read(all.join(&f)).unwrap() == std::fs::read(sharded.join(&f)).unwrap(), "{f}: byte for byte the unsharded batch's");
    }
    // A shard's --skip-existing sees its own lines only: all done.
    let (code, stdout, stderr) = run(runner().args(["run", M, "--quiet", "--json", "--set", "run.steps=1", "--prompts"]).arg(&p).arg("--out").arg(sharded.join("{index:02}-{seed}.png")).args([
        "--shard",
        "1/2",
        "--skip-existing",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(records(&stdout).iter().map(|r| (r["index"].as_u64().unwrap(), r["status"].as_str().unwrap())).collect::<Vec<_>>(), [(1, "skipped"), (3, "skipped")]);
}

#[test]
fn bad_shards_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "{\"seed\": 1}\n{\"seed\": 2}\n");
    let broken = ["--set", "pipeline.source=/nonexistent"];
    let tpl = dir.path().join("{index}.png");
    // Not K/N, K not below N, no shards: usage errors (exit 2), as clap's other flag errors.
    for (bad, says) in [
        ("2/2", "must be below N"),
        ("3/2", "must be below N"),
        ("0/0", "at least 1"),
        ("1", "expected K/N"),
        ("a/2", "expected K/N"),
        ("-1/2", "expected K/N"),
        ("1/2/3", "expected K/N"),
        ("", "expected K/N"),
    ] {
        let (code, _, stderr) = run(runner().args(["run", M, "--quiet"]).args(broken).arg("--prompts").arg(&p).arg("--out").arg(&tpl).arg(format!("--shard={bad}")));
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--shard") && stderr.contains(says), "{bad}: {stderr}");
    }
    // Without --prompts: nothing to shard.
    let (code, _, stderr) = run(runner().args(["run", M, "--shard", "0/2"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("--prompts"), "{stderr}");
    // A template that does not name lines apart would let two shards write one file.
    let (code, stdout, stderr) = run(runner().args(["run", M, "--quiet", "--json"]).args(broken).arg("--prompts").arg(&p).arg("--out").arg(dir.path().join("{seed}.png")).args(["--shard", "0/2"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("--shard 0/2") && stderr.contains("{index} or {line}"), "{stderr}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["error"]["message"].is_string(), "{stdout}");
    assert_eq!(files(dir.path()), ["prompts.jsonl"], "nothing written");
}

/// Issue 24 item 10: `--prompts /dev/zero` read without bound until the OOM killer. Devices are
/// refused at once; a FIFO that never ends a line is cut at the line cap with a clear error.
#[test]
fn prompts_files_are_capped_and_devices_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broken = ["--set", "pipeline.source=/nonexistent"];
    let (code, _, stderr) = run(runner().args(["run", M, "--quiet"]).args(broken).args(["--prompts", "/dev/zero"]).arg("--out").arg(dir.path().join("{index}.png")));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot read the prompts file `/dev/zero`") && stderr.contains("not a regular file"), "{stderr}");
    // A FIFO fed by an endless writer of one line: refused at the line cap (the writer gets EPIPE).
    let fifo = dir.path().join("p.jsonl");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            let chunk = vec![b'a'; 1 << 16];
            for _ in 0..64 {
                if f.write_all(&chunk).is_err() {
                    return;
                }
            }
        }
    });
    let (code, _, stderr) = run(runner().args(["run", M, "--quiet"]).args(broken).arg("--prompts").arg(&fifo).arg("--out").arg(dir.path().join("{index}.png")));
    writer.join().unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("line 1 is longer than 1 MiB"), "{stderr}");
}
