//! `runner-torch`'s side of the command line ([`runner_core::cli`]): the commands that run
//! tensors (`run`, `info`; `serve` in [`crate::serve`], batches in [`crate::batch`]); every other
//! command runs as in `runner`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use runner::diag;
use runner::manifest::{self, Overrides};
pub use runner_core::cli::{flag_renamer, parse_devices, stderr, Cli, Color, Command, Failure};

/// Runs any command of the command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { file, out, dump, devices, simulate, quiet, json, locked, prompts, skip_existing, force, shard, layers } => {
            let (spec, simulated) = match (devices, simulate) {
                (_, Some(s)) => (Some(s), true),
                (d, None) => (d, false),
            };
            let job = RunJob { file: &file, out, dump, devices: spec.as_deref(), simulate: simulated, quiet, json, locked, overrides: &layers.overrides(), color: cli.color };
            match prompts {
                Some(p) => crate::batch::batch(
                    job,
                    &p,
                    if skip_existing {
                        crate::batch::Existing::Skip
                    } else if force {
                        crate::batch::Existing::Replace
                    } else {
                        crate::batch::Existing::Refuse
                    },
                    shard,
                ),
                None => run_job(job),
            }
        }
        Command::Serve { file, listen, insecure_bind, devices, simulate, locked, drain_timeout, layers } => {
            let simulated = simulate.is_some();
            let devices = parse_devices(simulate.or(devices).as_deref(), simulated).map_err(anyhow::Error::msg)?;
            crate::serve::serve(crate::serve::ServeJob { file: &file, listen: &listen, insecure_bind, devices, simulate: simulated, locked, drain_timeout, overrides: &layers.overrides() })
        }
        Command::Info { json } => info(json),
        _ => runner_core::cli::run(cli),
    }
}

/// A run's failure as the command line reports it.
pub(crate) trait ExecFailure {
    /// A run's failure, `rename` applied to what it says (`--devices` -> `--simulate`).
    fn exec(file: &std::path::Path, e: runner::exec::ExecError, rename: &dyn Fn(String) -> String) -> Failure;
}

impl ExecFailure for Failure {
    fn exec(file: &std::path::Path, e: runner::exec::ExecError, rename: &dyn Fn(String) -> String) -> Failure {
        use runner::exec::ExecError as E;
        let e = match e {
            E::Plan(p) => {
                let mut f = Failure::plan(file, p);
                f.message = rename(f.message);
                return f;
            }
            E::Preflight(d) => return Failure::pipeline(file, d),
            e => e,
        };
        let kind = match &e {
            E::Checkpoint(_) => "checkpoint",
            E::Model(_) => "model",
            E::Inventory(_) => "devices",
            E::Text(_) => "tokenizer",
            E::Scheduler(_) => "scheduler",
            E::Io { .. } => "io",
            E::Plan(_) | E::Preflight(_) | E::Unsupported(_) | E::Cancelled { .. } => "run",
        };
        Failure::new(kind, format!("`{}`: {}", file.display(), rename(e.to_string())))
    }
}

/// `runner run`'s flags, parsed.
pub(crate) struct RunJob<'a> {
    pub file: &'a std::path::Path,
    pub out: Option<PathBuf>,
    pub dump: Option<PathBuf>,
    pub devices: Option<&'a str>,
    pub simulate: bool,
    pub quiet: bool,
    pub json: bool,
    pub locked: bool,
    pub overrides: &'a Overrides,
    pub color: Color,
}

fn run_job(job: RunJob) -> anyhow::Result<ExitCode> {
    let (json, quiet, color) = (job.json, job.quiet, job.color);
    let report = match run_inner(job) {
        Ok(r) => r,
        Err(f) => return f.report(json, color),
    };
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !quiet {
        for n in &report.plan_notes {
            eprintln!("note: {n}");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.images {
            println!("wrote {}", p.display());
        }
        if report.simulated {
            let map: Vec<String> = report.device_map.iter().map(|(k, v)| format!("{k} -> {v}")).collect();
            println!("simulated devices (ran on the CPU): {}", map.join(", "));
        }
        let t = &report.timings;
        println!(
            "seed {}, {} steps ({} denoiser calls), {}, {}x{}; load {:.2} s, encode {:.2} s, denoise {:.2} s (first step {:.3} s, then {:.3} s/step), decode {:.2} s, total {:.2} s",
            report.seed, report.steps, report.unet_calls, report.scheduler, report.width, report.height, t.load_s, t.encode_s, t.denoise_s, t.first_step_s, t.seconds_per_step, t.decode_s, t.total_s
        );
        let b = |n: u64| runner::units::ByteSize(n).display_decimal();
        let used: Vec<String> = report
            .devices
            .iter()
            .filter(|(_, u)| u.peak_bytes > 0)
            .map(|(d, u)| format!("{d} {} of {} (plan: {} peak, {} resident)", b(u.peak_bytes), b(u.budget_bytes), b(u.planned_peak_bytes), b(u.planned_resident_bytes)))
            .collect();
        println!("peak resident weights: {}", used.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_inner(job: RunJob) -> Result<runner::exec::RunReport, Failure> {
    let RunJob { file, out, dump, devices, simulate, quiet, locked, overrides, color, .. } = job;
    // The inventory's and executor's messages name `--devices`; a simulated run's came from `--simulate`.
    let flag = flag_renamer(simulate);
    let devices = parse_devices(devices, simulate).map_err(|e| Failure::new("devices", e))?;
    let loaded = manifest::load_locked(file, overrides, locked).map_err(|d| Failure::manifest(file, d))?;
    diag::render_all(&loaded.warnings, &mut stderr(color)).map_err(|e| Failure::new("io", e))?;
    let lock_sha256 = if locked { Some(runner::lock::verified_sha256(&loaded).map_err(|e| Failure::new("lock", e))?) } else { None };
    if let Some(t) = loaded.manifest.run.threads {
        tch::set_num_threads(t as i32);
    }
    let opts = runner::exec::RunOptions { out, dump, plan: runner::plan::build::BuildOptions { devices, weights_only: false }, progress: !quiet, simulate, lock_sha256, ..Default::default() };
    // libtorch reports failures inside an op (out of memory, an unsupported kernel) as panics
    // through tch: turn them into an error message and exit 1, not a crash.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner::exec::run(&loaded, &opts)));
    std::panic::set_hook(previous);
    match result {
        Ok(r) => r.map_err(|e| Failure::exec(file, e, &flag)),
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown error".into());
            Err(Failure::new("libtorch", format!("`{}`: libtorch failed while running: {msg}", file.display())))
        }
    }
}

fn info(json: bool) -> anyhow::Result<ExitCode> {
    let info = runner::runtime::info();
    runner::runtime::smoke_test().context("libtorch does not work in this binary")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("libtorch {}", info.libtorch_version);
        println!("CUDA backend loaded: {}", info.cuda_backend_loaded);
        println!("CUDA devices: {}{}", info.cuda_device_count, if info.cudnn_available { " (cuDNN available)" } else { "" });
        println!("CPU threads: {}", info.cpu_threads);
        println!("smoke test: ok");
    }
    Ok(ExitCode::SUCCESS)
}
