//! The command line: flags parsed into plain values, then dispatched.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use runner::diag::{self, Diagnostic};
use runner::manifest::{self, Overrides};

macro_rules! layers_help {
    () => {
        "\
Configuration layers, lowest to highest priority:
  1. the manifest file
  2. environment variables RUNNER_<SECTION>__<KEY>, e.g. RUNNER_RUN__STEPS=20,
     RUNNER_COMPONENTS__UNET__DEVICE=cuda:1 (variables without a double underscore,
     such as RUNNER_OS set by CI systems, are ignored)
  3. --set KEY=VALUE flags, e.g. --set run.steps=20 --set 'placement.max_memory.\"cuda:0\"=10GiB'
Values of 2 and 3 are TOML literals when they parse as one (20, true, [1, 2]), strings otherwise.
Relative paths are resolved against the manifest's folder when the file sets them, and against
the current directory when 2 or 3 do.

Sizes: a number of bytes, or a number with a unit: KB MB GB TB (powers of 1000) or KiB MiB GiB
TiB (powers of 1024); decimals allowed (1.5GB). A lowercase b (5Gb) is refused: accelerate reads
it as bits, huggingface_hub as bytes."
    };
}

/// Run diffusion pipelines (Stable Diffusion 1.x and 2.x, SDXL) from version-controlled TOML
/// manifests.
#[derive(Debug, Parser)]
#[command(name = "runner", version, about, after_help = "Logs: set RUST_LOG (e.g. RUST_LOG=runner=debug).")]
pub struct Cli {
    /// When to colour diagnostics.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check manifests against schemas/manifest.schema.json and the rules a schema cannot
    /// express; every problem of a file is reported at once, at file:line:col.
    ///
    /// Exit status: 0 when every file is valid (warnings allowed), 1 otherwise.
    #[command(after_help = concat!("Examples:\n  runner validate manifests/tiny-sd15.toml\n  runner validate --manifest-only manifests/*.toml     # before the models are downloaded\n  runner validate --json --set run.steps=20 manifests/tiny-sd15.toml\n\n", layers_help!()))]
    Validate {
        /// Manifest files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print a JSON report on stdout instead of diagnostics on stderr.
        #[arg(long)]
        json: bool,
        /// Also check every file the manifest reads against MANIFEST.lock (see `runner lock`).
        #[arg(long)]
        locked: bool,
        /// Check the manifest alone (schema and the rules between its keys), not its pipeline
        /// folder: for CI before the models are downloaded. A missing folder is then a warning.
        #[arg(long)]
        manifest_only: bool,
        #[command(flatten)]
        layers: LayerArgs,
    },
    /// Write MANIFEST.lock: the size and sha256 of every file the manifest reads
    /// (model_index.json, configs, tokenizer files, every weight shard, run.latents). With
    /// `--locked`, validate (and later plan and run) refuse files that differ from it.
    #[command(after_help = concat!("Examples:\n  runner lock manifests/tiny-sd15.toml\n  runner validate --locked manifests/tiny-sd15.toml\n\n", layers_help!()))]
    Lock {
        /// The manifest (TOML) to use.
        #[arg(value_name = "MANIFEST")]
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        layers: LayerArgs,
    },
    /// Generate images: plan, load each component on its planned device, encode the prompts,
    /// denoise from the seeded initial latents with classifier-free guidance, decode, and write
    /// PNGs (atomically) whose text chunks carry what makes each image again: A1111's
    /// `parameters` (prompt, steps, sampler, CFG scale, seed, size, model) and a `runner` JSON
    /// with the batch position, dtype, lock and effective-manifest digests.
    ///
    /// Offload (`placement.offload`, or per component `components.NAME.offload`): `model` keeps
    /// a component's weights in host memory and moves it to its device for its turn; `sequential`
    /// streams one leaf module at a time; `group` one block group at a time, the next one
    /// prefetched (RUNNER_PREFETCH_STREAM=1: on a side CUDA stream, experimental). Every mode gives
    /// the image of no offload.
    #[command(after_help = concat!("Examples:\n  runner run manifests/tiny-sd15.toml --out cat.png\n  runner run manifests/tiny-sdxl.toml --simulate \"cuda:0=40MB,cuda:1=40MB\" --json\n  RUST_LOG=runner=info runner run manifests/tiny-sd15.toml --set run.seed=7 --set run.steps=20\n  runner run manifests/tiny-sd15.toml --prompts prompts.jsonl --out 'out/{index:04}-{seed}.png' --skip-existing --json\n  runner run manifests/tiny-sd15.toml --prompts prompts.jsonl --out 'out/{index:04}-{seed}.png' --shard 1/4     # indexes 1, 5, 9, ...\n\n", layers_help!()))]
    Run {
        /// The manifest (TOML) to use.
        #[arg(value_name = "MANIFEST")]
        file: PathBuf,
        /// Write the image here instead of run.output (batches: NAME-0.png, NAME-1.png, ...). With
        /// --prompts: the template of the output names (see --prompts).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Write intermediate tensors (tokens, embeddings, every step, the image) to DIR/dump.safetensors.
        #[arg(long, value_name = "DIR")]
        dump: Option<PathBuf>,
        /// The hardware to plan for (as for `runner plan`).
        #[arg(long, value_name = "SPEC", conflicts_with = "simulate")]
        devices: Option<String>,
        /// Plan for these devices (e.g. "cuda:0=40MB,cuda:1=40MB,cpu=2GiB") but execute everything
        /// on the CPU: device maps, component boundaries and offload hooks run where no GPU
        /// exists. Weights are accounted per simulated device (a budget exceeded is an error) and
        /// their peaks reported beside the plan's; working memory is planned, not measured. Without
        /// `cpu=`, the host's budget is placement.max_memory.cpu, else the detected RAM.
        #[arg(long, value_name = "SPEC")]
        simulate: Option<String>,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        /// Print a JSON summary (images, seed, device map, timings, per-device budget and peak of
        /// resident weights beside the plan's figures); a failure prints
        /// {"error": {"message", "kind", "options"}}.
        #[arg(long)]
        json: bool,
        /// Check every file the manifest reads against MANIFEST.lock first.
        #[arg(long)]
        locked: bool,
        /// Batch: generate every non-empty line of this JSON-lines file on the one loaded
        /// pipeline, each line an object of `[run]` keys (and `scheduler`) layered over the
        /// manifest as `--set run.KEY=VALUE` flags are ({"prompt": "a cat", "seed": 7, "steps":
        /// 20}). `--out` is then
        /// a template of the output names: {index} (0-based among non-empty lines), {line} (line
        /// number), {seed}, {name} (the manifest's), with zero padding as in {index:04}; default
        /// `<run.output's stem>-{index:04}.png` beside it. A line without a seed (in it or the
        /// manifest) gets one drawn and reported. A bad line is reported and the others generated
        /// (exit status 1). `--json` prints one JSON object per line:
        /// {"index", "line", "status": "ok"|"skipped"|"error", "images", "seed", "error", ...}.
        #[arg(long, value_name = "FILE.jsonl", conflicts_with = "dump")]
        prompts: Option<PathBuf>,
        /// Batch: leave the lines whose images all exist (resume a killed batch); the others are
        /// generated (each image written to a temp file and renamed: none is ever half-written).
        #[arg(long, requires = "prompts", conflicts_with = "force")]
        skip_existing: bool,
        /// Batch: replace existing images (without it or --skip-existing, a batch refuses to
        /// start when any of its images exists).
        #[arg(long, requires = "prompts")]
        force: bool,
        /// Batch: generate only this process's share of the lines, those whose {index} modulo N
        /// is K (0-based: 0/4 ... 3/4), so that N processes (a Kubernetes Indexed Job's pods:
        /// `--shard $(JOB_COMPLETION_INDEX)/4`) generate every line once between them. The other
        /// lines are left out of the report; {index} and {line} stay the file's, and the template
        /// must contain one of them, so that shards never write one file.
        #[arg(long, value_name = "K/N", requires = "prompts")]
        shard: Option<runner::exec::batch::Shard>,
        #[command(flatten)]
        layers: LayerArgs,
    },
    /// Resolve the manifest to a concrete device map without loading a weight: component sizes
    /// from safetensors headers at their dtypes, budgets from placement.max_memory (or --devices,
    /// or the detected GPUs and RAM minus a reserve), the placement strategy, pins and offload
    /// modes. Prints each component's device and why, and each device's budget, planned peak and
    /// free memory. When nothing fits, says what is missing and which changes would work (exit 1;
    /// with --json, also as {"error": {"message", "kind", "options"}} on stdout).
    ///
    /// The host always takes part (offloaded weights live there). A component that fits no GPU
    /// whole (nor, with strategy auto, split across them) goes by placement.overflow: "stream"
    /// (default) runs it on a GPU with the lightest offload mode that fits (model, group,
    /// sequential), "cpu" puts it on the CPU as diffusers does, "error" refuses.
    #[command(after_help = concat!("Examples:\n  runner plan manifests/sdxl.toml --devices \"cuda:0=8GB,cuda:1=8GB,cpu=64GiB\"\n  runner plan manifests/tiny-sd15.toml --json\n  runner plan manifests/sdxl.toml --set placement.overflow=cpu --weights-only\n\n", layers_help!()))]
    Plan {
        /// The manifest (TOML) to use.
        #[arg(value_name = "MANIFEST")]
        file: PathBuf,
        /// Print JSON (device_map, hf_device_map, components, devices).
        #[arg(long)]
        json: bool,
        /// The hardware to plan for instead of this machine's, e.g.
        /// "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB". placement.max_memory still sets the budgets.
        /// Without `cpu=`, the host's budget is the detected RAM minus a reserve.
        #[arg(long, value_name = "SPEC")]
        devices: Option<String>,
        /// Count weights only, as diffusers' device_map="balanced" does (no working memory).
        #[arg(long)]
        weights_only: bool,
        /// Check every file the manifest reads against MANIFEST.lock first.
        #[arg(long)]
        locked: bool,
        #[command(flatten)]
        layers: LayerArgs,
    },
    /// Serve the manifest's pipeline over HTTP: the weights are loaded once and warmed up with a
    /// one-step generation, then requests are layered over the manifest as `--set run.KEY=VALUE`
    /// flags are and generated one after the other (a served PNG equals `runner run`'s with the
    /// same flags, byte for byte).
    ///
    /// `POST /v1/images` (a JSON object of `[run]` keys, `prompt` required; `"response": "json"`
    /// for base64 PNGs, the seed and timings) answers with the image. `POST /v1/jobs` queues
    /// the same body and answers 202 with a job: `GET /v1/jobs/{id}` (state, step i/N, timings),
    /// `GET /v1/jobs/{id}/image`, `GET /v1/jobs/{id}/events` (server-sent progress), `DELETE
    /// /v1/jobs/{id}` (cancels between steps). `GET /healthz` (alive), `GET /readyz` (200 once
    /// loaded and warmed up; 503 before and while draining), `GET /metrics` (Prometheus).
    ///
    /// `[serve]` in the manifest: `queue` (waiting requests; 429 with Retry-After beyond),
    /// `max_steps`, `max_pixels`, `max_batch` (422 beyond), `timeout` (seconds per request; 504
    /// beyond), `read_timeout` (seconds to send a request; 408), `token_env` (an environment
    /// variable holding a bearer token that /v1/* and /metrics then require). SIGTERM or SIGINT:
    /// stop accepting, let queued and running jobs finish for --drain-timeout seconds, cancel the
    /// rest, exit 0. Prints `listening on http://ADDR` first.
    #[command(after_help = concat!("Examples:\n  runner serve manifests/tiny-sd15.toml\n  runner serve manifests/tiny-sd15.toml --listen 127.0.0.1:0\n  curl -s localhost:8080/v1/images -d '{\"prompt\": \"a cat\", \"seed\": 7}' > cat.png\n  curl -s localhost:8080/v1/jobs -d '{\"prompt\": \"a cat\"}'\n\n", layers_help!()))]
    Serve {
        /// The manifest (TOML) to use.
        #[arg(value_name = "MANIFEST")]
        file: PathBuf,
        /// The address and port to listen on (port 0: any free port, printed).
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Listen on a non-loopback address although the manifest sets no `serve.token_env`.
        #[arg(long)]
        insecure_bind: bool,
        /// The hardware to plan for (as for `runner plan`).
        #[arg(long, value_name = "SPEC", conflicts_with = "simulate")]
        devices: Option<String>,
        /// Plan for these devices but execute everything on the CPU (as `runner run --simulate`).
        #[arg(long, value_name = "SPEC")]
        simulate: Option<String>,
        /// Check every file the manifest reads against MANIFEST.lock first.
        #[arg(long)]
        locked: bool,
        /// On SIGTERM/SIGINT, seconds to let queued and running jobs finish before they are
        /// cancelled (between two steps).
        #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
        drain_timeout: std::time::Duration,
        #[command(flatten)]
        layers: LayerArgs,
    },
    /// Show the effective manifest after layering, and where each value came from.
    #[command(after_help = concat!("Examples:\n  runner config manifests/tiny-sd15.toml\n  RUNNER_RUN__STEPS=20 runner config --json manifests/tiny-sd15.toml\n\n", layers_help!()))]
    Config {
        /// The manifest (TOML) to use.
        #[arg(value_name = "MANIFEST")]
        file: PathBuf,
        /// Print JSON: the typed manifest and the origin of each key.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        layers: LayerArgs,
    },
    /// Show what a checkpoint holds, from safetensors headers alone (no weights are read):
    /// components, classes, files and shards, tensors, parameters, bytes per stored dtype and
    /// at each target dtype, variants found.
    ///
    /// PATH: a diffusers pipeline folder (with model_index.json), a component folder, a
    /// *.safetensors.index.json, or one .safetensors file.
    #[command(after_help = "Examples:\n  runner inspect tests/fixtures/tiny-sdxl\n  runner inspect tests/fixtures/tiny-sdxl/unet --json\n  runner inspect models/sdxl --variant fp16\n")]
    Inspect {
        /// A pipeline folder, component folder, *.safetensors.index.json or .safetensors file.
        path: PathBuf,
        /// Prefer weight files of this variant (e.g. fp16), as `pipeline.variant` does.
        #[arg(long)]
        variant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a sharded checkpoint that diffusers/transformers `from_pretrained` load: shards of at
    /// most --max-shard-size packed greedily in tensor-name order (a larger tensor gets a shard of
    /// its own), `*.safetensors.index.json` when there is more than one shard, config.json copied.
    ///
    /// SRC: a component folder, a *.safetensors.index.json, or one .safetensors file. DIR is
    /// replaced in one rename when everything is written: an interrupted run leaves no
    /// half-checkpoint. Memory stays bounded: tensors stream from the mapped source.
    #[command(
        after_help = "Examples:\n  runner shard tests/fixtures/tiny-sdxl/unet --out /tmp/unet-sharded --max-shard-size 300KB\n  runner shard models/sdxl/unet --out models/sdxl-unet-fp16 --dtype fp16 --variant fp16 --max-shard-size 2GB\n"
    )]
    Shard {
        /// The checkpoint to shard: a component folder, *.safetensors.index.json or .safetensors file.
        src: PathBuf,
        /// Output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Largest shard, e.g. 5GB, 2GiB, 500MB (the size grammar of manifests).
        #[arg(long, value_name = "SIZE", default_value = "10GB", value_parser = parse_size)]
        max_shard_size: runner::units::ByteSize,
        /// Convert floating-point tensors (integer tensors are kept).
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
        /// Name the files as this variant (`diffusion_pytorch_model.fp16-00001-of-00002.safetensors`).
        #[arg(long)]
        variant: Option<String>,
        /// Replace DIR if it exists and is not empty.
        #[arg(long)]
        force: bool,
        /// Skip flushing shards to disk before DIR is swapped in (faster; an interrupted process
        /// still leaves no half-checkpoint, but a power loss might).
        #[arg(long)]
        no_fsync: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the manifest JSON schema (equal to schemas/manifest.schema.json).
    #[command(after_help = "Examples:\n  runner schema > manifest.schema.json\n")]
    Schema,
    /// Show the libtorch this binary uses and the devices it sees; runs one op per backend.
    #[command(after_help = "Examples:\n  runner info\n  LD_LIBRARY_PATH=/path/to/torch/lib runner info --json     # with the CUDA build of torch\n")]
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

fn parse_size(s: &str) -> Result<runner::units::ByteSize, String> {
    s.parse().map_err(|e: runner::units::SizeError| e.to_string())
}

#[derive(Debug, Args)]
struct LayerArgs {
    /// Override a manifest key: KEY is a dotted path (run.steps), VALUE a TOML literal or a
    /// plain string. Repeatable; later flags win.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

impl LayerArgs {
    fn overrides(&self) -> Overrides {
        Overrides::from_process(self.sets.clone())
    }
}

/// A byte progress bar on stderr, hidden when stderr is not a terminal.
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}").expect("template").progress_chars("=> "));
    bar.set_message(what.to_string());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

pub(crate) fn stderr(color: Color) -> StandardStream {
    let choice = match color {
        Color::Always => ColorChoice::Always,
        Color::Never => ColorChoice::Never,
        Color::Auto if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() => ColorChoice::Auto,
        Color::Auto => ColorChoice::Never,
    };
    StandardStream::stderr(choice)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { files, json, locked, manifest_only, layers } => validate(&files, json, locked, manifest_only, &layers.overrides(), cli.color),
        Command::Lock { file, json, layers } => {
            let loaded = match manifest::load(&file, &layers.overrides()) {
                Ok(m) => m,
                Err(diags) => {
                    diag::render_all(&diags, &mut stderr(cli.color))?;
                    return Ok(ExitCode::FAILURE);
                }
            };
            let r = runner::lock::write_lock(&loaded)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("wrote {}: {} files, {} hashed in {:.2} s ({:.2} GB/s)", r.lock.display(), r.files, runner::units::ByteSize(r.bytes), r.seconds, r.bytes as f64 / r.seconds.max(1e-9) / 1e9);
            }
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Plan { file, json, devices, weights_only, locked, layers } => plan(&file, json, devices.as_deref(), weights_only, locked, &layers.overrides(), cli.color),
        Command::Serve { file, listen, insecure_bind, devices, simulate, locked, drain_timeout, layers } => {
            let simulated = simulate.is_some();
            let devices = parse_devices(simulate.or(devices).as_deref(), simulated).map_err(anyhow::Error::msg)?;
            crate::serve::serve(crate::serve::ServeJob { file: &file, listen: &listen, insecure_bind, devices, simulate: simulated, locked, drain_timeout, overrides: &layers.overrides() })
        }
        Command::Config { file, json, layers } => config(&file, json, &layers.overrides(), cli.color),
        Command::Schema => {
            print!("{}", manifest::schema_json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Info { json } => info(json),
        Command::Shard { src, out, max_shard_size, dtype, variant, force, no_fsync, json } => {
            let dtype = dtype.map(|d| match d {
                DtypeArg::Fp32 => runner::manifest::Dtype::Fp32,
                DtypeArg::Fp16 => runner::manifest::Dtype::Fp16,
                DtypeArg::Bf16 => runner::manifest::Dtype::Bf16,
            });
            let opts = runner::checkpoint::shard::ShardOptions { max_shard_size: max_shard_size.0, dtype, variant, force, fsync: !no_fsync };
            let bar = progress_bar("sharding");
            let report = runner::checkpoint::shard::shard(&src, &out, &opts, &|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (name, size) in &report.files {
                    println!("{:>12}  {}", runner::units::ByteSize(*size).to_string(), out.join(name).display());
                }
                if let Some(i) = &report.index {
                    println!("{:>12}  {}", "index", out.join(i).display());
                }
                let gbps = report.total_size as f64 / report.seconds.max(1e-9) / 1e9;
                println!("{} tensors, {} in {} file(s), {:.2} s ({gbps:.2} GB/s)", report.tensors, runner::units::ByteSize(report.total_size), report.files.len(), report.seconds);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, variant, json } => {
            let report = runner::checkpoint::inspect::inspect(&path, variant.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", runner::checkpoint::inspect::render_table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(files: &[PathBuf], json: bool, locked: bool, manifest_only: bool, overrides: &Overrides, color: Color) -> anyhow::Result<ExitCode> {
    let mut all_ok = true;
    let mut reports = vec![];
    let mut err = stderr(color);
    for file in files {
        let (ok, diags) = match manifest::load(file, overrides) {
            Ok(m) => {
                let mut d = m.warnings.clone();
                if !manifest_only {
                    // Everything knowable without loading a weight: the folder is required now.
                    d.retain(|w| w.key.as_deref() != Some("pipeline.source"));
                    match runner::preflight::check(&m) {
                        Ok(checked) => d.extend(checked.run.warnings),
                        Err(found) => d.extend(found),
                    }
                }
                if locked {
                    if let Err(e) = runner::lock::verify_lock(&m) {
                        d.push(Diagnostic::error(format!("--locked: {e}"), diag::Location::Path(runner::lock::lock_path(file))));
                    }
                }
                (!d.iter().any(Diagnostic::is_error), d)
            }
            Err(d) => (false, d),
        };
        all_ok &= ok;
        if json {
            reports.push(serde_json::json!({
                "file": file.display().to_string(),
                "valid": ok,
                "errors": diags.iter().filter(|d| d.is_error()).count(),
                "warnings": diags.iter().filter(|d| !d.is_error()).count(),
                "diagnostics": diags.iter().map(Diagnostic::to_json).collect::<Vec<_>>(),
            }));
        } else {
            diag::render_all(&diags, &mut err)?;
            let (e, w) = (diags.iter().filter(|d| d.is_error()).count(), diags.iter().filter(|d| !d.is_error()).count());
            let plural = |n: usize, s: &str| format!("{n} {s}{}", if n == 1 { "" } else { "s" });
            if ok {
                let extra = if w > 0 { format!(" ({})", plural(w, "warning")) } else { String::new() };
                println!("ok: {}{extra}", file.display());
            } else {
                eprintln!("invalid: {}: {}{}", file.display(), plural(e, "error"), if w > 0 { format!(", {}", plural(w, "warning")) } else { String::new() });
            }
        }
    }
    if json {
        let out = serde_json::json!({ "valid": all_ok, "files": reports });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn config(file: &std::path::Path, json: bool, overrides: &Overrides, color: Color) -> anyhow::Result<ExitCode> {
    let loaded = match manifest::load(file, overrides) {
        Ok(m) => m,
        Err(diags) => {
            diag::render_all(&diags, &mut stderr(color))?;
            return Ok(ExitCode::FAILURE);
        }
    };
    diag::render_all(&loaded.warnings, &mut stderr(color))?;
    let rows = loaded.provenance_table();
    if json {
        let origins: serde_json::Map<String, serde_json::Value> = rows.iter().map(|(k, _, o)| (k.clone(), o.clone().into())).collect();
        let out = serde_json::json!({
            "manifest": loaded.manifest,
            "pipeline_source": loaded.pipeline_source(),
            "origins": origins,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(3).max(3);
        let w1 = rows.iter().map(|r| r.1.chars().count().min(48)).max().unwrap_or(5).max(5);
        let mut out = std::io::stdout().lock();
        writeln!(out, "{:w0$}  {:w1$}  origin", "key", "value")?;
        for (k, v, o) in &rows {
            let v = if v.chars().count() > 48 { format!("{}...", v.chars().take(45).collect::<String>()) } else { v.clone() };
            writeln!(out, "{k:w0$}  {v:w1$}  {o}")?;
        }
        writeln!(out, "\npipeline folder: {}", loaded.pipeline_source().display())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Why `plan` or `run` failed: rendered for people on stderr, and with `--json` also as a JSON
/// document on stdout (`{"error": {"message", "kind", "options"}}`), so that machines reading
/// the output never get an empty one.
pub(crate) struct Failure {
    /// `manifest`, `devices`, `lock`, `checkpoint`, `plan`, `model`, `io`, `libtorch`, `run`.
    kind: &'static str,
    message: String,
    /// For `plan`: the changes that would fit.
    options: Vec<String>,
    /// For `manifest`: the diagnostics, rendered at file:line:col.
    diagnostics: Vec<Diagnostic>,
}

impl Failure {
    pub(crate) fn new(kind: &'static str, message: impl std::fmt::Display) -> Failure {
        Failure { kind, message: message.to_string(), options: vec![], diagnostics: vec![] }
    }

    /// Diagnostics, summed up as "`FILE` WHAT (N errors)".
    fn diagnosed(kind: &'static str, file: &std::path::Path, what: &str, diagnostics: Vec<Diagnostic>) -> Failure {
        let n = diagnostics.iter().filter(|d| d.is_error()).count();
        Failure { diagnostics, ..Failure::new(kind, format!("`{}` {what} ({n} error{})", file.display(), if n == 1 { "" } else { "s" })) }
    }

    pub(crate) fn manifest(file: &std::path::Path, diagnostics: Vec<Diagnostic>) -> Failure {
        Failure::diagnosed("manifest", file, "is not a valid manifest", diagnostics)
    }

    /// What preflight found in the pipeline folder (knowable without loading a weight).
    fn pipeline(file: &std::path::Path, diagnostics: Vec<Diagnostic>) -> Failure {
        Failure::diagnosed("pipeline", file, "cannot run with its pipeline folder", diagnostics)
    }

    fn plan(file: &std::path::Path, e: runner::plan::PlanError) -> Failure {
        Failure { options: e.options.clone(), ..Failure::new("plan", format!("cannot place `{}` within the budgets: {}", file.display(), e.message)) }
    }

    /// A run's failure, `rename` applied to what it says (`--devices` -> `--simulate`).
    pub(crate) fn exec(file: &std::path::Path, e: runner::exec::ExecError, rename: &dyn Fn(String) -> String) -> Failure {
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

    pub(crate) fn report(self, json: bool, color: Color) -> anyhow::Result<ExitCode> {
        if self.diagnostics.is_empty() {
            eprintln!("error: {}{}", self.message, runner::plan::options_text(&self.options));
        } else {
            diag::render_all(&self.diagnostics, &mut stderr(color))?;
        }
        if json {
            let mut error = serde_json::json!({"message": self.message, "kind": self.kind, "options": self.options});
            if !self.diagnostics.is_empty() {
                error["diagnostics"] = self.diagnostics.iter().map(Diagnostic::to_json).collect::<Vec<_>>().into();
            }
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "error": error }))?);
        }
        Ok(ExitCode::FAILURE)
    }
}

fn plan(file: &std::path::Path, json: bool, devices: Option<&str>, weights_only: bool, locked: bool, overrides: &Overrides, color: Color) -> anyhow::Result<ExitCode> {
    match plan_inner(file, json, devices, weights_only, locked, overrides, color) {
        Ok(code) => Ok(code),
        Err(f) => f.report(json, color),
    }
}

fn plan_inner(file: &std::path::Path, json: bool, devices: Option<&str>, weights_only: bool, locked: bool, overrides: &Overrides, color: Color) -> Result<ExitCode, Failure> {
    use runner::plan::{build, inventory::Inventory, render};
    let devices = devices.map(Inventory::parse_spec).transpose().map_err(|e| Failure::new("devices", e))?;
    let loaded = manifest::load(file, overrides).map_err(|d| Failure::manifest(file, d))?;
    diag::render_all(&loaded.warnings, &mut stderr(color)).map_err(|e| Failure::new("io", e))?;
    if locked {
        runner::lock::verify_lock(&loaded).map_err(|e| Failure::new("lock", e))?;
    }
    let t = std::time::Instant::now();
    let checked = runner::preflight::check(&loaded).map_err(|d| Failure::pipeline(file, d))?;
    diag::render_all(&checked.run.warnings, &mut stderr(color)).map_err(|e| Failure::new("io", e))?;
    for n in &checked.folder.notes {
        tracing::info!("{n}");
    }
    let opts = build::BuildOptions { devices, weights_only };
    let inventory = build::inventory(&loaded, &opts).map_err(|e| Failure::new("devices", e))?;
    let input = build::plan_input(&loaded, &checked.folder, &checked.configs, &checked.run, inventory, &opts);
    let plan = runner::plan::plan(&input).map_err(|e| Failure::plan(file, e))?;
    tracing::debug!(elapsed = ?t.elapsed(), "planned");
    let out = if json {
        serde_json::to_string_pretty(&render::to_json(&plan, weights_only)).map_err(|e| Failure::new("io", e))? + "\n"
    } else {
        format!(
            "plan for {} ({}, strategy {}, overflow {})\n{}",
            file.display(),
            loaded.manifest.pipeline.kind.as_str(),
            plan.strategy.as_str(),
            plan.overflow.as_str(),
            render::to_table(&plan, weights_only)
        )
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
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
    let loaded = manifest::load(file, overrides).map_err(|d| Failure::manifest(file, d))?;
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

/// `--drain-timeout`: seconds, a non-negative number.
fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let v: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(v).map_err(|_| format!("`{s}` is not a number of seconds from 0 up"))
}

/// `--devices SPEC` or `--simulate SPEC`: the inventory, or why not (naming the flag given).
pub(crate) fn parse_devices(spec: Option<&str>, simulate: bool) -> Result<Option<runner::plan::inventory::Inventory>, String> {
    spec.map(runner::plan::inventory::Inventory::parse_spec).transpose().map_err(|e| flag_renamer(simulate)(e.to_string()))
}

/// Messages name `--devices`; under `--simulate` they name that flag instead.
pub(crate) fn flag_renamer(simulate: bool) -> impl Fn(String) -> String {
    move |e: String| if simulate { e.replace("--devices", "--simulate") } else { e }
}
