//! The command line, one for both binaries: flags parsed into plain values, then dispatched. The
//! commands that compute nothing run here, without libtorch; `run`, `serve` and `info` run in
//! `runner-torch`, which `runner` executes in its own place ([`exec_torch`]).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use crate::diag::{self, Diagnostic};
use crate::manifest::{self, Overrides};

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
#[command(
    name = "runner",
    version,
    about = "Run diffusion pipelines (Stable Diffusion 1.x and 2.x, SDXL, SD3, FLUX.1) from version-controlled TOML manifests on libtorch",
    after_help = "Logs: set RUST_LOG (e.g. RUST_LOG=runner=debug)."
)]
pub struct Cli {
    /// When to colour diagnostics.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    pub color: Color,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Fetch from the Hugging Face Hub exactly the files the manifest's `hf://` sources read
    /// (model_index.json, the enabled components' configs, tokenizers and scheduler config, the
    /// weights of the chosen variant with diffusers' per-component fallback, named single files)
    /// into the standard cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// ~/.cache/huggingface/hub), which diffusers reads too. Transfers run concurrently, resume
    /// partial files and are verified against the Hub's ETag (sha256 for LFS files).
    /// `HF_ENDPOINT`, `HF_TOKEN` (or the token file) and `HF_HUB_OFFLINE` are honoured.
    /// `validate`, `plan`, `run` and `serve` never use the network.
    #[command(after_help = concat!("Examples:\n  runner pull manifests/flux-dev.toml\n  runner pull --dry-run manifests/sdxl.toml         # files and bytes, nothing written\n  runner lock manifests/sdxl.toml && runner pull --locked manifests/sdxl.toml   # the locked commits\n\n", layers_help!()))]
    Pull {
        /// The manifest (TOML) to use.
        #[arg(value_name = "MANIFEST")]
        file: PathBuf,
        /// List the files and their sizes; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Fetch the commits MANIFEST.lock pins (see `runner lock`), not the revisions' current ones.
        #[arg(long)]
        locked: bool,
        /// Concurrent transfers.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Tries of a request the Hub answers 429 or 5xx, or whose connection fails (backing
        /// off from 0.5 s, doubling, or as `Retry-After` says).
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// Print a JSON report on stdout.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
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
        shard: Option<crate::batch::Shard>,
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
    /// at each target dtype, variants found. For a .gguf file: its architecture and key names
    /// (diffusers' or the original checkpoint's), and tensors, parameters and bytes per type.
    ///
    /// PATH: a diffusers pipeline folder (with model_index.json), a component folder, a
    /// *.safetensors.index.json, one .safetensors file, or one .gguf file.
    #[command(
        after_help = "Examples:\n  runner inspect tests/fixtures/tiny-sdxl\n  runner inspect tests/fixtures/tiny-sdxl/unet --json\n  runner inspect models/sdxl --variant fp16\n  runner inspect models/flux1-dev-Q4_0.gguf\n"
    )]
    Inspect {
        /// A pipeline folder, component folder, *.safetensors.index.json, .safetensors or .gguf file.
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
        max_shard_size: crate::units::ByteSize,
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
    /// Write a FLUX.1 or SD3/SD3.5 transformer as one GGUF file that diffusers'
    /// `from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`, the Python `gguf`
    /// reader and runner load: Linear weights quantized to --type as `gguf.quants.quantize` does,
    /// with city96's rules for the rest (1-D and small tensors F32; the embedders and the final
    /// layer, and rows that are not whole blocks, in the source's 16-bit type).
    ///
    /// SRC: a component folder, a *.safetensors.index.json or one .safetensors file, in diffusers'
    /// key names or the original checkpoint's (BFL, SAI; kept, without a
    /// `model.diffusion_model.` prefix). FILE is written to a temp file and renamed into place;
    /// memory stays bounded (tensors stream in chunks).
    #[command(
        after_help = "Examples:\n  runner quantize models/FLUX.1-dev/transformer --type q8_0 --out models/flux1-dev-Q8_0.gguf\n  runner quantize models/sd3.5-large/transformer --type q4_0 --out /tmp/sd35-large-Q4_0.gguf --force\n"
    )]
    Quantize {
        /// The transformer: a component folder, *.safetensors.index.json or .safetensors file.
        src: PathBuf,
        /// The type of the quantized Linear weights.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        ggml_type: QuantType,
        /// Output .gguf file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The tensor names written: diffusers' (`transformer_blocks.0.attn.to_q.weight`; diffusers
        /// then loads the file with `config=`) or the original checkpoint's (BFL `double_blocks.0.img_attn.qkv`,
        /// SAI `joint_blocks.0...`, as city96's files and ComfyUI-GGUF have them; q, k and v joined
        /// along rows, quantized rows unchanged). Default: as the source names them.
        #[arg(long, value_enum, value_name = "NAMES")]
        keys: Option<KeysArg>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
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

/// `runner quantize --keys`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeysArg {
    Diffusers,
    Original,
}

/// `runner quantize --type`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QuantType {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "f16")]
    F16,
}

impl QuantType {
    pub fn ggml(self) -> crate::checkpoint::gguf::GgmlType {
        use crate::checkpoint::gguf::GgmlType as G;
        match self {
            QuantType::Q8_0 => G::Q8_0,
            QuantType::Q4_0 => G::Q4_0,
            QuantType::Q4_1 => G::Q4_1,
            QuantType::Q5_0 => G::Q5_0,
            QuantType::Q5_1 => G::Q5_1,
            QuantType::Bf16 => G::BF16,
            QuantType::F16 => G::F16,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

fn parse_size(s: &str) -> Result<crate::units::ByteSize, String> {
    s.parse().map_err(|e: crate::units::SizeError| e.to_string())
}

#[derive(Debug, Args)]
pub struct LayerArgs {
    /// Override a manifest key: KEY is a dotted path (run.steps), VALUE a TOML literal or a
    /// plain string. Repeatable; later flags win.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl LayerArgs {
    pub fn overrides(&self) -> Overrides {
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

/// Runs `work` with a byte progress bar on stderr (when it is a terminal), fed `(done, total)`.
fn with_progress<T>(what: &str, work: impl FnOnce(&dyn Fn(u64, u64)) -> T) -> T {
    let bar = progress_bar(what);
    let result = work(&|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    result
}

pub fn stderr(color: Color) -> StandardStream {
    let choice = match color {
        Color::Always => ColorChoice::Always,
        Color::Never => ColorChoice::Never,
        Color::Auto if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() => ColorChoice::Auto,
        Color::Auto => ColorChoice::Never,
    };
    StandardStream::stderr(choice)
}

impl Cli {
    /// Whether the command runs tensors: `runner` hands it to `runner-torch`.
    pub fn needs_libtorch(&self) -> bool {
        matches!(self.command, Command::Run { .. } | Command::Serve { .. } | Command::Info { .. })
    }

    /// Whether the command was asked for JSON output (its errors then go to stdout too).
    fn json(&self) -> bool {
        match &self.command {
            Command::Run { json, .. } | Command::Info { json } => *json,
            _ => false,
        }
    }
}

impl Command {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Validate { .. } => "validate",
            Command::Lock { .. } => "lock",
            Command::Pull { .. } => "pull",
            Command::Run { .. } => "run",
            Command::Plan { .. } => "plan",
            Command::Serve { .. } => "serve",
            Command::Config { .. } => "config",
            Command::Inspect { .. } => "inspect",
            Command::Shard { .. } => "shard",
            Command::Quantize { .. } => "quantize",
            Command::Schema => "schema",
            Command::Info { .. } => "info",
        }
    }
}

/// The binary that runs the libtorch commands: `RUNNER_TORCH`, else `runner-torch` beside this
/// binary (symlinks to it resolved: `/proc/self/exe`).
pub fn torch_binary() -> Result<std::path::PathBuf, String> {
    if let Some(p) = std::env::var_os("RUNNER_TORCH").filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary's folder to look for `runner-torch` beside it: {e}"))?;
    Ok(exe.with_file_name("runner-torch"))
}

/// Replaces this process with `runner-torch` and the same arguments: the same pid, signals,
/// streams and exit status (`runner serve` under a supervisor stays the process it started).
/// Returns only when that fails, with the error reported as the command reports its own.
pub fn exec_torch(cli: &Cli) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let name = cli.command.name();
    let fail = |msg: String| Failure::new("libtorch", msg).report(cli.json(), cli.color).unwrap_or(ExitCode::FAILURE);
    let bin = match torch_binary() {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if !bin.is_file() {
        return fail(format!(
            "`runner {name}` runs tensors on libtorch, in `{}`, which {}: install it beside `runner` (`make build` builds both; the light `runner` alone runs validate, plan, inspect, lock, shard, config and schema), or set RUNNER_TORCH to its path",
            bin.display(),
            if bin.exists() { "is not a file" } else { "does not exist" }
        ));
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "runner".into());
    let err = std::process::Command::new(&bin).arg0(arg0).args(args).exec();
    fail(format!("`runner {name}`: cannot execute `{}`: {err}", bin.display()))
}

/// Logs on stderr, filtered by `RUST_LOG` (default: warnings), coloured on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .init();
}

/// A command's outcome as the process's: an error printed once, with its chain.
pub fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the commands that compute nothing (`run`, `serve` and `info`: see [`exec_torch`]).
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
            let r = crate::lock::write_lock(&loaded)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("wrote {}: {} files, {} hashed in {:.2} s ({:.2} GB/s)", r.lock.display(), r.files, crate::units::ByteSize(r.bytes), r.seconds, r.bytes as f64 / r.seconds.max(1e-9) / 1e9);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull { file, dry_run, locked, jobs, retries, json, quiet, layers } => pull(&file, dry_run, locked, jobs as usize, retries, json, quiet, &layers.overrides(), cli.color),
        Command::Plan { file, json, devices, weights_only, locked, layers } => plan(&file, json, devices.as_deref(), weights_only, locked, &layers.overrides(), cli.color),
        Command::Config { file, json, layers } => config(&file, json, &layers.overrides(), cli.color),
        Command::Schema => {
            print!("{}", manifest::schema_json());
            Ok(ExitCode::SUCCESS)
        }
        // `runner` hands these to `runner-torch` ([`exec_torch`]), which runs them itself.
        Command::Run { .. } | Command::Serve { .. } | Command::Info { .. } => Err(anyhow::anyhow!("`runner {}` runs in `runner-torch`, which has libtorch", cli.command.name())),
        Command::Shard { src, out, max_shard_size, dtype, variant, force, no_fsync, json } => {
            let dtype = dtype.map(|d| match d {
                DtypeArg::Fp32 => crate::manifest::Dtype::Fp32,
                DtypeArg::Fp16 => crate::manifest::Dtype::Fp16,
                DtypeArg::Bf16 => crate::manifest::Dtype::Bf16,
            });
            let opts = crate::checkpoint::shard::ShardOptions { max_shard_size: max_shard_size.0, dtype, variant, force, fsync: !no_fsync };
            let report = with_progress("sharding", |p| crate::checkpoint::shard::shard(&src, &out, &opts, p))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (name, size) in &report.files {
                    println!("{:>12}  {}", crate::units::ByteSize(*size).to_string(), out.join(name).display());
                }
                if let Some(i) = &report.index {
                    println!("{:>12}  {}", "index", out.join(i).display());
                }
                let gbps = report.total_size as f64 / report.seconds.max(1e-9) / 1e9;
                println!("{} tensors, {} in {} file(s), {:.2} s ({gbps:.2} GB/s)", report.tensors, crate::units::ByteSize(report.total_size), report.files.len(), report.seconds);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Quantize { src, ggml_type, out, keys, force, json } => {
            use crate::checkpoint::gguf::KeyStyle;
            let keys = keys.map(|k| match k {
                KeysArg::Diffusers => KeyStyle::Diffusers,
                KeysArg::Original => KeyStyle::Original,
            });
            let opts = crate::checkpoint::quantize::QuantizeOptions { ggml_type: ggml_type.ggml(), keys, force };
            let report = with_progress("quantizing", |p| crate::checkpoint::quantize::quantize(&src, &out, &opts, p))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let gb = |b: u64| crate::units::ByteSize(b).to_string();
                println!(
                    "{} ({} transformer, {} key names)",
                    report.out.display(),
                    report.family.as_str(),
                    if report.key_style == crate::checkpoint::gguf::KeyStyle::Diffusers { "diffusers" } else { "original" }
                );
                println!("{:<8} {:>8} {:>16} {:>12}", "type", "tensors", "parameters", "bytes");
                for t in &report.types {
                    println!("{:<8} {:>8} {:>16} {:>12}", t.ggml_type.name(), t.tensors, t.parameters, gb(t.bytes));
                }
                let gbps = report.source_bytes as f64 / report.seconds.max(1e-9) / 1e9;
                println!("{} tensors: {} read, {} written, {:.2} s ({gbps:.2} GB/s of source)", report.tensors, gb(report.source_bytes), gb(report.file_bytes), report.seconds);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, variant, json } if path.extension().is_some_and(|e| e == "gguf") => {
            if let Some(v) = variant {
                anyhow::bail!("`{}`: --variant {v} picks among a folder's weight files; a .gguf file is one file", path.display());
            }
            let report = crate::checkpoint::gguf::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::checkpoint::gguf::render_table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, variant, json }
            if path.is_file()
                && path.extension().is_some_and(|e| e == "safetensors")
                && crate::checkpoint::safetensors::read_header(&path).is_ok_and(|h| crate::checkpoint::lora::looks_like_lora(&h)) =>
        {
            if let Some(v) = variant {
                anyhow::bail!("`{}`: --variant {v} picks among a folder's weight files; a LoRA file is one file", path.display());
            }
            let report = crate::checkpoint::lora::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::checkpoint::lora::render_table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, variant, json } => {
            let report = crate::checkpoint::inspect::inspect(&path, variant.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::checkpoint::inspect::render_table(&report));
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
        let (ok, diags) = match manifest::load_locked(file, overrides, locked) {
            Ok(m) => {
                let mut d = m.warnings.clone();
                if !manifest_only {
                    // Everything knowable without loading a weight: the folder is required now.
                    d.retain(|w| w.key.as_deref() != Some("pipeline.source"));
                    match crate::preflight::check(&m) {
                        Ok(checked) => d.extend(checked.run.warnings),
                        Err(found) => d.extend(found),
                    }
                }
                if locked {
                    if let Err(e) = crate::lock::verify_lock(&m) {
                        d.push(Diagnostic::error(format!("--locked: {e}"), diag::Location::Path(crate::lock::lock_path(file))));
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

/// `runner pull`'s bars: the whole transfer, and one per file of 1 MiB or more while it moves.
struct PullBar {
    bars: indicatif::MultiProgress,
    total: indicatif::ProgressBar,
    files: std::sync::Mutex<std::collections::HashMap<(String, String), indicatif::ProgressBar>>,
}

impl PullBar {
    fn new(hidden: bool) -> PullBar {
        let target = if hidden || !std::io::stderr().is_terminal() { indicatif::ProgressDrawTarget::hidden() } else { indicatif::ProgressDrawTarget::stderr() };
        let bars = indicatif::MultiProgress::with_draw_target(target);
        let total = bars.add(progress_bar("pull"));
        PullBar { bars, total, files: Default::default() }
    }

    fn finish(&self) {
        self.total.finish_and_clear();
        let _ = self.bars.clear();
    }
}

impl crate::hub::pull::Progress for PullBar {
    fn bytes(&self, job: &crate::hub::pull::Job, n: u64) {
        self.total.inc(n);
        if let Some(b) = self.files.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.repo.clone(), job.path.clone())) {
            b.inc(n);
        }
    }
    fn start(&self, job: &crate::hub::pull::Job) {
        if job.meta.size >= 1 << 20 {
            let b = self.bars.add(progress_bar(&format!("  {}", job.path)));
            b.set_length(job.meta.size);
            self.files.lock().unwrap_or_else(|e| e.into_inner()).insert((job.repo.clone(), job.path.clone()), b);
        }
    }
    fn done(&self, job: &crate::hub::pull::Job) {
        if let Some(b) = self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(&(job.repo.clone(), job.path.clone())) {
            b.finish_and_clear();
            self.bars.remove(&b);
        }
        tracing::info!(repo = %job.repo, file = %job.path, bytes = job.meta.size, "in the cache");
    }
}

impl crate::hub::pull::PullProgress for PullBar {
    fn listed(&self, files: usize) {
        self.total.set_message(format!("pull {files} files"));
    }
    fn total(&self, bytes: u64) {
        self.total.set_length(bytes);
        self.total.reset_elapsed();
    }
    fn as_progress(&self) -> &dyn crate::hub::pull::Progress {
        self
    }
}

#[allow(clippy::too_many_arguments)]
fn pull(file: &std::path::Path, dry_run: bool, locked: bool, workers: usize, retries: u32, json: bool, quiet: bool, overrides: &Overrides, color: Color) -> anyhow::Result<ExitCode> {
    let loaded = match manifest::load(file, overrides) {
        Ok(m) => m,
        Err(diags) => {
            diag::render_all(&diags, &mut stderr(color))?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let cache = crate::hub::cache_dir();
    if loaded.hub.is_empty() {
        eprintln!("`{}` names no `hf://` source: nothing to pull", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let pins = if locked {
        if !crate::lock::lock_path(file).exists() {
            anyhow::bail!("--locked: `{}` does not exist: create it with `runner lock {}` (after a `runner pull`)", crate::lock::lock_path(file).display(), file.display());
        }
        crate::lock::hub_pins(file)?
    } else {
        Default::default()
    };
    if crate::hub::offline() {
        // As huggingface_hub's `local_files_only`: the cache must already hold everything.
        let m = manifest::load(file, &Overrides { pins, ..overrides.clone() }).map_err(|_| anyhow::anyhow!("`{}` no longer loads", file.display()))?;
        return match m.hub_problems() {
            None => {
                eprintln!("HF_HUB_OFFLINE is set: every `hf://` source of `{}` is in the cache `{}` (nothing checked online)", file.display(), cache.display());
                Ok(ExitCode::SUCCESS)
            }
            Some(p) => anyhow::bail!("HF_HUB_OFFLINE is set, so `runner pull` may not use the network, and the cache lacks: {p}"),
        };
    }
    // A file-size limit (`ulimit -f`) is then a write error naming the file, not a kill.
    // SAFETY: ignoring a signal, before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let mut client = crate::hub::pull::Client::from_env();
    client.tries = retries.max(1);
    let bar = PullBar::new(quiet || dry_run);
    let opts = crate::hub::pull::PullOptions { dry_run, workers, pins };
    let r = crate::hub::pull::pull_manifest(&client, &cache, &loaded, &opts, &bar);
    bar.finish();
    let r = r.map_err(|e| anyhow::anyhow!("runner pull `{}`: {e}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["repo", "commit", "file", "size", "status"].map(String::from).to_vec()];
    for f in &r.files {
        rows.push(vec![f.repo.clone(), f.commit[..12.min(f.commit.len())].to_string(), f.path.clone(), crate::units::ByteSize(f.size).to_string(), f.status.to_string()]);
    }
    print!("{}", crate::plan::render::table(&rows, 3));
    let rate = r.fetched_bytes as f64 / r.seconds.max(1e-9);
    if r.dry_run {
        println!("{} files, {} in all, {} to fetch into {} (dry run: nothing written)", r.files.len(), crate::units::ByteSize(r.bytes), crate::units::ByteSize(r.fetched_bytes), r.cache.display());
    } else {
        println!(
            "{} files, {} in all, {} fetched into {} in {:.1} s ({}/s)",
            r.files.len(),
            crate::units::ByteSize(r.bytes),
            crate::units::ByteSize(r.fetched_bytes),
            r.cache.display(),
            r.seconds,
            crate::units::ByteSize(rate as u64)
        );
    }
    Ok(ExitCode::SUCCESS)
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
pub struct Failure {
    /// `manifest`, `devices`, `lock`, `checkpoint`, `plan`, `model`, `io`, `libtorch`, `run`.
    pub kind: &'static str,
    pub message: String,
    /// For `plan`: the changes that would fit.
    pub options: Vec<String>,
    /// For `manifest`: the diagnostics, rendered at file:line:col.
    pub diagnostics: Vec<Diagnostic>,
}

impl Failure {
    pub fn new(kind: &'static str, message: impl std::fmt::Display) -> Failure {
        Failure { kind, message: message.to_string(), options: vec![], diagnostics: vec![] }
    }

    /// Diagnostics, summed up as "`FILE` WHAT (N errors)".
    fn diagnosed(kind: &'static str, file: &std::path::Path, what: &str, diagnostics: Vec<Diagnostic>) -> Failure {
        let n = diagnostics.iter().filter(|d| d.is_error()).count();
        Failure { diagnostics, ..Failure::new(kind, format!("`{}` {what} ({n} error{})", file.display(), if n == 1 { "" } else { "s" })) }
    }

    pub fn manifest(file: &std::path::Path, diagnostics: Vec<Diagnostic>) -> Failure {
        Failure::diagnosed("manifest", file, "is not a valid manifest", diagnostics)
    }

    /// What preflight found in the pipeline folder (knowable without loading a weight).
    pub fn pipeline(file: &std::path::Path, diagnostics: Vec<Diagnostic>) -> Failure {
        Failure::diagnosed("pipeline", file, "cannot run with its pipeline folder", diagnostics)
    }

    pub fn plan(file: &std::path::Path, e: crate::plan::PlanError) -> Failure {
        Failure { options: e.options.clone(), ..Failure::new("plan", format!("cannot place `{}` within the budgets: {}", file.display(), e.message)) }
    }

    pub fn report(self, json: bool, color: Color) -> anyhow::Result<ExitCode> {
        if self.diagnostics.is_empty() {
            eprintln!("error: {}{}", self.message, crate::plan::options_text(&self.options));
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
    use crate::plan::{build, inventory::Inventory, render};
    let devices = devices.map(Inventory::parse_spec).transpose().map_err(|e| Failure::new("devices", e))?;
    let loaded = manifest::load_locked(file, overrides, locked).map_err(|d| Failure::manifest(file, d))?;
    diag::render_all(&loaded.warnings, &mut stderr(color)).map_err(|e| Failure::new("io", e))?;
    if locked {
        crate::lock::verify_lock(&loaded).map_err(|e| Failure::new("lock", e))?;
    }
    let t = std::time::Instant::now();
    let checked = crate::preflight::check(&loaded).map_err(|d| Failure::pipeline(file, d))?;
    diag::render_all(&checked.run.warnings, &mut stderr(color)).map_err(|e| Failure::new("io", e))?;
    for n in &checked.folder.notes {
        tracing::info!("{n}");
    }
    let opts = build::BuildOptions { devices, weights_only };
    let inventory = build::inventory(&loaded, &opts).map_err(|e| Failure::new("devices", e))?;
    let input = build::plan_input(&loaded, &checked.folder, &checked.configs, &checked.run, inventory, &opts);
    let plan = crate::plan::plan(&input).map_err(|e| Failure::plan(file, e))?;
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

/// `--drain-timeout`: seconds, a non-negative number.
pub fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let v: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(v).map_err(|_| format!("`{s}` is not a number of seconds from 0 up"))
}

/// `--devices SPEC` or `--simulate SPEC`: the inventory, or why not (naming the flag given).
pub fn parse_devices(spec: Option<&str>, simulate: bool) -> Result<Option<crate::plan::inventory::Inventory>, String> {
    spec.map(crate::plan::inventory::Inventory::parse_spec).transpose().map_err(|e| flag_renamer(simulate)(e.to_string()))
}

/// Messages name `--devices`; under `--simulate` they name that flag instead.
pub fn flag_renamer(simulate: bool) -> impl Fn(String) -> String {
    move |e: String| if simulate { e.replace("--devices", "--simulate") } else { e }
}
