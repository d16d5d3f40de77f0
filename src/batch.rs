//! `runner run MANIFEST --prompts FILE.jsonl`: every line of the file generated on one loaded
//! pipeline. Everything that can be known without loading (the template, the file, each line's
//! keys and values, colliding or existing outputs) is checked before a weight is read; a bad line
//! is that line's error in the report, the others are generated. `--shard K/N` keeps the lines
//! whose index modulo N is K: N processes share one file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use runner::diag;
use runner::exec::batch::{self as b, Fields, Shard, Template};
use runner::manifest::{self, LoadedManifest};

use crate::cli::{stderr, ExecFailure, Failure, RunJob};

/// What to do with images that exist already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse to start (the default: never overwrite a user's file).
    Refuse,
    /// Leave lines whose images all exist (`--skip-existing`: resume).
    Skip,
    /// Replace them (`--force`).
    Replace,
}

/// One line, ready (or not) to generate.
struct Job {
    index: usize,
    line: usize,
    state: State,
}

enum State {
    Error(String),
    Pending { m: Box<LoadedManifest>, base: PathBuf, outputs: Vec<PathBuf>, seed: u64 },
    Skipped { outputs: Vec<PathBuf>, seed: u64 },
}

pub fn batch(job: RunJob, prompts: &Path, existing: Existing, shard: Option<Shard>) -> anyhow::Result<ExitCode> {
    let (json, color) = (job.json, job.color);
    match batch_inner(job, prompts, existing, shard) {
        Ok(code) => Ok(code),
        Err(f) => f.report(json, color),
    }
}

fn batch_inner(job: RunJob, prompts: &Path, existing: Existing, shard: Option<Shard>) -> Result<ExitCode, Failure> {
    let RunJob { file, out, devices, simulate, quiet, json, locked, overrides, color, .. } = job;
    // Before anything is loaded: the template, the file, the manifest.
    let template = match &out {
        Some(t) => Some(Template::parse(&t.to_string_lossy()).map_err(|e| Failure::new("run", e))?),
        None => None,
    };
    // A shard names its images apart from the other shards' only through the line's number.
    if let (Some(s), Some(t)) = (shard, &template) {
        if !t.numbers_lines() {
            return Err(Failure::new(
                "run",
                format!("--shard {s}: the output template `{}` must contain {{index}} or {{line}}, so that no two shards write one file", out.as_deref().unwrap_or(Path::new("")).display()),
            ));
        }
    }
    let mut lines = b::read_lines(prompts).map_err(|e| Failure::new("io", format!("cannot read the prompts file `{}`: {e}", prompts.display())))?;
    // The other shards' lines are theirs: not read further, not reported.
    let total = lines.len();
    if let Some(s) = shard {
        lines.retain(|l| s.contains(l.index));
    }
    // The inventory's and executor's messages name `--devices`; a simulated run's came from `--simulate`.
    let flag = crate::cli::flag_renamer(simulate);
    let devices = crate::cli::parse_devices(devices, simulate).map_err(|e| Failure::new("devices", e))?;
    let base = manifest::load_locked(file, overrides, locked).map_err(|d| Failure::manifest(file, d))?;
    diag::render_all(&base.warnings, &mut stderr(color)).map_err(|e| Failure::new("io", e))?;
    let lock_sha256 = if locked { Some(runner::lock::verified_sha256(&base).map_err(|e| Failure::new("lock", e))?) } else { None };
    let template = match template {
        Some(t) => t,
        None => Template::parse(&b::default_template(&runner::exec::default_output(&base))).map_err(|e| Failure::new("run", e))?,
    };
    let base_warnings: Vec<String> = base.warnings.iter().map(|d| d.message.clone()).collect();

    // Each line's manifest: the line's keys layered above `--set` (a seed drawn for lines with
    // none, so that the template and the report can name it).
    let drawn = {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64) % (1 << 53)
    };
    let load_line = |sets: &[String]| -> Result<LoadedManifest, String> {
        let mut o = overrides.clone();
        o.sets.extend(sets.iter().cloned());
        manifest::relayer(&base, &o).map_err(|d| {
            let errors: Vec<String> = d.iter().filter(|d| d.is_error()).map(|d| d.message.clone()).collect();
            errors.join("; ")
        })
    };
    let mut jobs = vec![];
    for l in &lines {
        let state = match &l.sets {
            Err(e) => State::Error(e.clone()),
            Ok(sets) => {
                let loaded = load_line(sets).and_then(|m| match m.manifest.run.seed {
                    Some(_) => Ok(m),
                    None => load_line(&[sets.clone(), vec![format!("run.seed={}", (drawn + l.index as u64) % (1 << 53))]].concat()),
                });
                match loaded {
                    Err(e) => State::Error(e),
                    Ok(m) => {
                        let seed = m.manifest.run.seed.unwrap_or_default();
                        let path = template.expand(&Fields { index: l.index, line: l.line, seed, name: &m.manifest.name });
                        let outputs = runner::exec::numbered(&path, m.manifest.run.batch.unwrap_or(1) as usize);
                        State::Pending { m: Box::new(m), base: path, outputs, seed }
                    }
                }
            }
        };
        jobs.push(Job { index: l.index, line: l.line, state });
    }
    let outputs = || {
        jobs.iter().flat_map(|j| match &j.state {
            State::Pending { outputs, .. } => outputs.clone(),
            _ => vec![],
        })
    };
    let dup = b::duplicates(outputs());
    if let Some(d) = dup.first() {
        return Err(Failure::new(
            "run",
            format!(
                "two lines of `{}` would write `{}`{}: name the outputs apart with {{index}} or {{line}} in the template (`--out`)",
                prompts.display(),
                d.display(),
                if dup.len() > 1 { format!(" (and {} more)", dup.len() - 1) } else { String::new() }
            ),
        ));
    }
    // Existing images: refused, skipped or replaced; never overwritten unasked.
    let exists: Vec<PathBuf> = outputs().filter(|p| p.exists()).collect();
    if existing == Existing::Refuse && !exists.is_empty() {
        return Err(Failure::new(
            "io",
            format!(
                "{} of the batch's images exist already (first: `{}`): pass --skip-existing to keep them and generate the rest (resume), or --force to replace them",
                exists.len(),
                exists[0].display()
            ),
        ));
    }
    // What killed writers left beside our outputs (their temp files), whatever happens next.
    let all: Vec<PathBuf> = outputs().collect();
    runner::fsutil::remove_stale_temps_of(&all);
    if existing == Existing::Skip {
        for j in &mut jobs {
            if let State::Pending { outputs, seed, .. } = &j.state {
                if outputs.iter().all(|p| p.exists()) {
                    j.state = State::Skipped { outputs: outputs.clone(), seed: *seed };
                }
            }
        }
    }

    // Load once, for the first line to generate, then generate line after line.
    let first = jobs.iter().find_map(|j| match &j.state {
        State::Pending { base, .. } => Some(base.clone()),
        _ => None,
    });
    let images = jobs.iter().any(|j| matches!(&j.state, State::Pending { m, .. } if m.manifest.run.image.is_some()));
    let opts = runner::exec::RunOptions {
        images,
        out: first.clone(),
        dump: None,
        plan: runner::plan::build::BuildOptions { devices, weights_only: false },
        progress: !quiet,
        simulate,
        lock_sha256,
        ..Default::default()
    };
    if let Some(t) = base.manifest.run.threads {
        tch::set_num_threads(t as i32);
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let of = shard.map(|s| format!(" (shard {s}: {} of the file's {total} lines)", jobs.len())).unwrap_or_default();
    let result = run_lines(&base, &opts, first.is_some(), jobs, &base_warnings, json, quiet, &flag, file, &of);
    std::panic::set_hook(previous);
    result
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown error".into())
}

#[allow(clippy::too_many_arguments)]
fn run_lines(
    base: &LoadedManifest,
    opts: &runner::exec::RunOptions,
    load: bool,
    jobs: Vec<Job>,
    base_warnings: &[String],
    json: bool,
    quiet: bool,
    flag: &dyn Fn(String) -> String,
    file: &Path,
    shard_note: &str,
) -> Result<ExitCode, Failure> {
    let mut session = if load {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner::exec::load(base, opts))) {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => return Err(Failure::exec(file, e, flag)),
            Err(p) => return Err(Failure::new("libtorch", format!("`{}`: libtorch failed while loading: {}", file.display(), panic_text(p)))),
        }
    } else {
        None
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(jobs.len() as u64), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(indicatif::ProgressStyle::with_template("batch [{bar:30}] {pos}/{len} lines {msg} eta {eta}").expect("template").progress_chars("=> "));
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (mut ok, mut skipped, mut failed) = (0, 0, 0);
    for j in jobs {
        let started = Instant::now();
        let mut rec = serde_json::json!({ "index": j.index, "line": j.line });
        match j.state {
            State::Error(e) => {
                failed += 1;
                rec["status"] = "error".into();
                rec["error"] = e.into();
            }
            State::Skipped { outputs, seed } => {
                skipped += 1;
                rec["status"] = "skipped".into();
                rec["images"] = serde_json::json!(outputs);
                rec["seed"] = seed.into();
            }
            State::Pending { m, base: out, outputs, seed } => {
                bar.set_message(format!("(line {})", j.line));
                let line_opts = runner::exec::RunOptions { out: Some(out), progress: false, ..opts.clone() };
                let session = session.as_mut().expect("loaded for pending lines");
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.generate_run(&m, &line_opts)));
                let r = match r {
                    Ok(r) => r.map_err(|e| flag(e.to_string())),
                    Err(p) => Err(format!("libtorch failed while running: {}", panic_text(p))),
                };
                rec["seed"] = seed.into();
                match r {
                    Ok(report) => {
                        ok += 1;
                        let t = &report.timings;
                        rec["status"] = "ok".into();
                        rec["images"] = serde_json::json!(report.images);
                        rec["steps"] = report.steps.into();
                        rec["width"] = report.width.into();
                        rec["height"] = report.height.into();
                        rec["timings"] = serde_json::json!({
                            "encode_s": t.encode_s, "denoise_s": t.denoise_s, "first_step_s": t.first_step_s,
                            "seconds_per_step": t.seconds_per_step, "decode_s": t.decode_s, "total_s": started.elapsed().as_secs_f64(),
                        });
                        if let Some(s) = t.image_encode_s {
                            rec["timings"]["image_encode_s"] = s.into();
                        }
                        let mut warnings: Vec<String> = m.warnings.iter().map(|d| d.message.clone()).chain(report.warnings).filter(|w| !base_warnings.contains(w)).collect();
                        warnings.dedup();
                        rec["warnings"] = serde_json::json!(warnings);
                    }
                    Err(e) => {
                        failed += 1;
                        rec["status"] = "error".into();
                        rec["images"] = serde_json::json!(outputs);
                        rec["error"] = e.into();
                    }
                }
            }
        }
        bar.inc(1);
        bar.suspend(|| print_record(&rec, json));
    }
    bar.finish_and_clear();
    if !quiet || failed > 0 {
        eprintln!("batch: {ok} generated, {skipped} skipped, {failed} failed{shard_note}");
    }
    Ok(if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_record(rec: &serde_json::Value, json: bool) {
    if json {
        println!("{rec}");
        return;
    }
    let line = &rec["line"];
    let images = || rec["images"].as_array().map(|a| a.iter().filter_map(|p| p.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    match rec["status"].as_str() {
        Some("ok") => println!("line {line}: wrote {} (seed {}, {:.2} s)", images(), rec["seed"], rec["timings"]["total_s"].as_f64().unwrap_or(0.0)),
        Some("skipped") => println!("line {line}: skipped, exists: {}", images()),
        _ => eprintln!("error: line {line}: {}", rec["error"].as_str().unwrap_or("")),
    }
    if let Some(w) = rec["warnings"].as_array() {
        for w in w.iter().filter_map(|w| w.as_str()) {
            eprintln!("warning: line {line}: {w}");
        }
    }
}
