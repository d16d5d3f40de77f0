//! The manifest's serde types. Field docs become the JSON schema's descriptions
//! (`runner schema`), which editors show through the `#:schema` directive.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::units::ByteSize;

/// The manifest format version this runner reads.
pub const SCHEMA_VERSION: u32 = 1;

/// A runner manifest: one reviewed file that says which diffusion pipeline to run, where each of
/// its components is placed, and what to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "runner manifest")]
pub struct Manifest {
    /// Version of the manifest format; this runner reads version 1.
    #[schemars(range(min = 1, max = 1))]
    pub schema_version: u32,
    /// A name for this deployment, used in logs, plans and image metadata.
    #[schemars(length(min = 1, max = 200))]
    pub name: String,
    pub pipeline: Pipeline,
    /// Per-component settings, keyed by the diffusers folder name of a model component
    /// (`text_encoder`, `text_encoder_2`, `unet`, `vae`, `safety_checker`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, Component>,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub run: Run,
    /// `runner serve`: the request queue and per-request limits (ignored by other commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<Serve>,
    /// LoRA adapters by name (`[adapters.NAME]`), merged into the weights at load in name order,
    /// as diffusers' `load_lora_weights` + `set_adapters` + `fuse_lora` do.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adapters: BTreeMap<String, Adapter>,
}

/// One LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Adapter {
    /// The LoRA file (`.safetensors`: diffusers/PEFT `lora_A`/`lora_B` keys, or kohya's
    /// `lora_unet_…`/`lora_te_…` with `.alpha`), relative to the manifest file, or on the Hub:
    /// `hf://ORG/NAME[@REVISION]/PATH/FILE.safetensors` (read from the cache; `runner pull`).
    #[schemars(length(min = 1))]
    pub source: PathBuf,
    /// The adapter's weight (diffusers' `set_adapters` weight, default 1.0): each layer gets
    /// `scale × alpha / rank × B @ A` (alpha = rank when the file has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub scale: Option<f64>,
    /// The components it applies to (default: every component the file has weights for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<String>>,
    /// `true` (default): merged into the weights at load (diffusers' `fuse_lora`), nothing extra to
    /// plan. `false`: live, the low-rank branch runs beside each layer (as PEFT's layers do), its
    /// scale changeable per run (`run.adapter_scales`); its weights count on the component's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<bool>,
    /// `false`: keys that match no module of the pipeline are left out with a warning instead of
    /// being an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `runner serve`'s settings: how many requests may wait for the worker, and the largest job
/// one request may ask for (a request over a limit is answered 422 naming it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    /// Requests that may wait for the worker (default 8); one more is answered 429 with
    /// `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub queue: Option<u32>,
    /// The most `steps` a request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<u32>,
    /// The most pixels (`width` x `height`) of one image a request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64))]
    pub max_pixels: Option<u64>,
    /// The most images (`batch`) a request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch: Option<u32>,
    /// The schedulers a request may choose (`"scheduler"`); without this key, any that fits
    /// the pipeline's kind. A request that names none gets the manifest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub schedulers: Option<Vec<SchedulerKind>>,
    /// Seconds a request may take from its arrival, queueing included; then it is cancelled
    /// between two steps and answered 504 (an asynchronous job ends `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001))]
    pub timeout: Option<f64>,
    /// Seconds a client has to send a request's head and then its body (default 30): a client
    /// that stalls is answered 408 or disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001))]
    pub read_timeout: Option<f64>,
    /// The environment variable holding a bearer token: `/v1/*` and `/metrics` then need
    /// `Authorization: Bearer <token>`, and the server may listen on any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub token_env: Option<String>,
}

/// The pipeline: what kind it is and where its diffusers folder lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub kind: PipelineKind,
    /// A diffusers pipeline folder (with `model_index.json`), relative to the manifest file, or
    /// a Hub repo: `hf://ORG/NAME`, `hf://ORG/NAME@REVISION` (branch, tag or commit; `%2F` for a
    /// `/` in it), `hf://ORG/NAME/SUBFOLDER`, read from the Hugging Face cache (`HF_HUB_CACHE`,
    /// else `HF_HOME/hub`), never from the network: `runner pull` fetches what the manifest reads.
    #[schemars(length(min = 1))]
    pub source: PathBuf,
    /// Default dtype of every component.
    #[serde(default)]
    pub dtype: Dtype,
    /// Prefer weight files of this variant (`fp16` reads `*.fp16.safetensors`), falling back to
    /// the plain files the way diffusers does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub variant: Option<String>,
    /// Use this scheduler instead of the one in `scheduler/scheduler_config.json` (its config
    /// values are kept, as diffusers' `Scheduler.from_config` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerKind>,
}

/// The kind of pipeline: `stable-diffusion` (SD 1.x/2.x, diffusers `StableDiffusionPipeline`),
/// `stable-diffusion-xl` (`StableDiffusionXLPipeline`), `stable-diffusion-3` (SD3 / SD3.5,
/// `StableDiffusion3Pipeline`) or `flux` (FLUX.1 dev and schnell, `FluxPipeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineKind {
    StableDiffusion,
    StableDiffusionXl,
    #[serde(rename = "stable-diffusion-3")]
    StableDiffusion3,
    Flux,
}

impl PipelineKind {
    pub const ALL: [PipelineKind; 4] = [PipelineKind::StableDiffusion, PipelineKind::StableDiffusionXl, PipelineKind::StableDiffusion3, PipelineKind::Flux];

    pub fn as_str(self) -> &'static str {
        match self {
            PipelineKind::StableDiffusion => "stable-diffusion",
            PipelineKind::StableDiffusionXl => "stable-diffusion-xl",
            PipelineKind::StableDiffusion3 => "stable-diffusion-3",
            PipelineKind::Flux => "flux",
        }
    }

    /// The model-level components (the ones that hold weights and are placed) a pipeline of this
    /// kind has, in diffusers' execution order.
    pub fn components(self) -> &'static [&'static str] {
        match self {
            PipelineKind::StableDiffusion => &["text_encoder", "unet", "vae", "safety_checker"],
            PipelineKind::StableDiffusionXl => &["text_encoder", "text_encoder_2", "unet", "vae"],
            PipelineKind::StableDiffusion3 => &["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"],
            // `text_encoder` is CLIP-L (pooled output only), `text_encoder_2` T5.
            PipelineKind::Flux => &["text_encoder", "text_encoder_2", "transformer", "vae"],
        }
    }

    /// Whether the pipeline's denoiser is trained for flow matching (and so needs a
    /// `FlowMatch*` scheduler) rather than noise prediction (the UNet pipelines).
    pub fn flow_matching(self) -> bool {
        match self {
            PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl => false,
            PipelineKind::StableDiffusion3 | PipelineKind::Flux => true,
        }
    }

    /// diffusers' default `num_inference_steps`.
    pub fn default_steps(self) -> u32 {
        match self {
            PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl => 50,
            PipelineKind::StableDiffusion3 | PipelineKind::Flux => 28,
        }
    }

    /// diffusers' default `guidance_scale` (FLUX.1-dev: the embedded guidance value; schnell
    /// has no guidance embedding and ignores it).
    pub fn default_guidance_scale(self) -> f64 {
        match self {
            PipelineKind::StableDiffusion => 7.5,
            PipelineKind::StableDiffusionXl => 5.0,
            PipelineKind::StableDiffusion3 => 7.0,
            PipelineKind::Flux => 3.5,
        }
    }

    /// diffusers' default `max_sequence_length` (T5 tokens), for the kinds with a T5 encoder.
    pub fn default_max_sequence_length(self) -> Option<u32> {
        match self {
            PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl => None,
            PipelineKind::StableDiffusion3 => Some(256),
            PipelineKind::Flux => Some(512),
        }
    }

    /// Components a pipeline of this kind can run without (`enabled = false`).
    pub fn optional_components(self) -> &'static [&'static str] {
        match self {
            PipelineKind::StableDiffusion => &["safety_checker"],
            PipelineKind::StableDiffusionXl => &[],
            // diffusers' `text_encoder_3=None`: zeros in T5's place.
            PipelineKind::StableDiffusion3 => &["text_encoder_3"],
            // FluxPipeline has no path without T5.
            PipelineKind::Flux => &[],
        }
    }

    /// `run` keys only some kinds read (elsewhere they are warned about as ignored); the keys
    /// every kind reads (`prompt`, `negative_prompt`, `steps`, `guidance_scale`, ...) are not
    /// listed.
    pub fn own_run_keys(self) -> &'static [&'static str] {
        match self {
            PipelineKind::StableDiffusion => &["clip_skip"],
            PipelineKind::StableDiffusionXl => &["prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size", "clip_skip"],
            PipelineKind::StableDiffusion3 => &["prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "max_sequence_length", "clip_skip"],
            // FluxPipeline's `__call__` has no `clip_skip` (it reads CLIP's pooled output only).
            PipelineKind::Flux => &["prompt_2", "negative_prompt_2", "max_sequence_length", "true_cfg_scale"],
        }
    }
}

impl Run {
    /// FLUX: diffusers' `do_true_cfg`, `true_cfg_scale > 1` with a `negative_prompt` (an empty
    /// one counts; `negative_prompt_2` alone does not): two transformer passes per step.
    pub fn true_cfg(&self) -> bool {
        self.true_cfg_scale.unwrap_or(1.0) > 1.0 && self.negative_prompt.is_some()
    }
}

/// Floating-point type of weights and compute: `fp32`, `fp16` or `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }
    pub fn size_bytes(self) -> u64 {
        match self {
            Dtype::Fp32 => 4,
            Dtype::Fp16 | Dtype::Bf16 => 2,
        }
    }
}

/// A scheduler, by the diffusers class it mirrors: `pndm` (PNDMScheduler), `ddim`
/// (DDIMScheduler), `euler` (EulerDiscreteScheduler), `euler-ancestral`
/// (EulerAncestralDiscreteScheduler), `dpmpp-2m` (DPMSolverMultistepScheduler),
/// `dpmpp-2m-karras` (the same with `use_karras_sigmas = true`), `lms` (LMSDiscreteScheduler),
/// `flow-match-euler` (FlowMatchEulerDiscreteScheduler, for flow-matching models such as SD3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    #[serde(rename = "dpmpp-2m")]
    DpmPP2M,
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPP2MKarras,
    Lms,
    FlowMatchEuler,
}

/// How a component's weights are kept while the pipeline runs: `none` (resident on the planned
/// device), `model` (in host memory, moved to the device for the component's turn, like
/// diffusers' `enable_model_cpu_offload`), `sequential` (leaf modules streamed one at a time, like
/// `enable_sequential_cpu_offload`), `group` (blocks streamed as groups with prefetch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    #[default]
    None,
    Model,
    Sequential,
    Group,
}

/// Settings of one model component; every key is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Weights from elsewhere: a folder, a `*.safetensors.index.json`, one `.safetensors` file or,
    /// for a FLUX.1 or SD3/SD3.5 transformer, one `.gguf` file (its config from the pipeline
    /// folder); relative to the manifest file, or on the Hub (`hf://ORG/NAME[@REVISION]/PATH`, a
    /// folder or a file, from the cache: `runner pull`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub source: Option<PathBuf>,
    /// This component's dtype (default: `pipeline.dtype`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// This component's weight variant (default: `pipeline.variant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub variant: Option<String>,
    /// Pin this component to a device; a pin that cannot fit is an error, never a move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// This component's offload mode (default: `placement.offload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<Offload>,
    /// `false` leaves an optional component out (e.g. SD 1.5's `safety_checker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Layerwise casting (diffusers `enable_layerwise_casting(storage_dtype, compute_dtype)`):
    /// weights kept in this narrower dtype and cast to `dtype` layer by layer as each one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_dtype: Option<StorageDtype>,
    /// Where this component's offloaded weights live (default: `placement.offload_target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_target: Option<OffloadTarget>,
    /// `group` offload: blocks per group (diffusers `num_blocks_per_group`; default:
    /// `placement.group_blocks`, else 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub group_blocks: Option<u32>,
    /// VAE only: decode in overlapping tiles (diffusers `enable_vae_tiling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<bool>,
    /// VAE only: decode a batch one image at a time (diffusers `enable_vae_slicing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slicing: Option<bool>,
}

/// `storage_dtype`: the dtype weights are stored in between layer calls: `fp8-e4m3`
/// (torch.float8_e4m3fn), `fp8-e5m2` (torch.float8_e5m2), or `fp16` / `bf16` under an fp32
/// compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StorageDtype {
    #[serde(rename = "fp8-e4m3")]
    Fp8E4m3,
    #[serde(rename = "fp8-e5m2")]
    Fp8E5m2,
    Fp16,
    Bf16,
}

impl StorageDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageDtype::Fp8E4m3 => "fp8-e4m3",
            StorageDtype::Fp8E5m2 => "fp8-e5m2",
            StorageDtype::Fp16 => "fp16",
            StorageDtype::Bf16 => "bf16",
        }
    }
    pub fn size_bytes(self) -> u64 {
        match self {
            StorageDtype::Fp8E4m3 | StorageDtype::Fp8E5m2 => 1,
            StorageDtype::Fp16 | StorageDtype::Bf16 => 2,
        }
    }
}

/// Where offloaded weights live: `host` (copies in host RAM, pinned on CUDA machines) or `disk`
/// (the memory-mapped checkpoint itself, served by the page cache; converted dtypes go to a
/// scratch file under `placement.scratch_dir`, removed on exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OffloadTarget {
    #[default]
    Host,
    Disk,
}

/// How components are assigned to devices.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub strategy: Strategy,
    /// Memory budget per device, e.g. `{ "cuda:0" = "10GiB", cpu = "32GiB" }`. When given, only
    /// the GPUs listed take part (as in diffusers); the host always does, its budget being `cpu`
    /// here, else `--devices`' `cpu=`, else the detected RAM minus a reserve. When absent, the
    /// detected (or `--devices`) GPUs take part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("propertyNames" = { "pattern": crate::device::DEVICE_PATTERN }))]
    pub max_memory: Option<BTreeMap<String, ByteSize>>,
    /// Default offload mode of every component.
    #[serde(default)]
    pub offload: Offload,
    /// What happens to a component that fits no GPU whole: `stream` it through a GPU with the
    /// lightest offload mode that fits (default), put it on the `cpu` as diffusers does, or make
    /// it an `error`.
    #[serde(default)]
    pub overflow: Overflow,
    /// Where offloaded weights live by default: `host` RAM or `disk` (see `OffloadTarget`).
    #[serde(default)]
    pub offload_target: OffloadTarget,
    /// `group` offload's default blocks per group (diffusers `num_blocks_per_group`; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub group_blocks: Option<u32>,
    /// The folder for `offload_target = "disk"`'s scratch files (weights converted to another
    /// dtype than stored), relative to the manifest; default: the system's temporary folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_dir: Option<PathBuf>,
}

/// `placement.overflow`: where a component goes when it fits no GPU whole (nor, under `auto`,
/// split across the GPUs).
/// - `stream`: planned on a GPU with the lightest offload mode that fits (`model`, then `group`,
///   then `sequential`), its weights in host memory; on the CPU only when no GPU can run it even
///   streamed.
/// - `cpu`: diffusers' placement: it runs on the CPU (`auto`: split over the GPUs and the CPU, as
///   accelerate's `infer_auto_device_map`).
/// - `error`: planning fails, explaining what would fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    #[default]
    Stream,
    Cpu,
    Error,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Stream => "stream",
            Overflow::Cpu => "cpu",
            Overflow::Error => "error",
        }
    }
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Balanced => "balanced",
            Strategy::Sequential => "sequential",
            Strategy::Auto => "auto",
        }
    }
}

/// `balanced`: diffusers' pipeline-level `device_map="balanced"` (largest component first,
/// devices in snake order); `sequential`: fill devices in order; `auto`: whole components where
/// they fit, splitting a component that fits no single device at block boundaries (accelerate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Balanced,
    Sequential,
    Auto,
}

/// What to generate. Unset keys take the pipeline's defaults as diffusers does (e.g. 50 steps,
/// guidance 7.5 for SD and 5.0 for SDXL, size from the UNet's `sample_size`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Run {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// SDXL, SD3: prompt for the second text encoder; FLUX: for T5 (default: `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_2: Option<String>,
    /// SDXL, SD3: negative prompt for the second text encoder; FLUX: for T5 (default:
    /// `negative_prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt_2: Option<String>,
    /// SD3: prompt for the T5 text encoder (default: `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_3: Option<String>,
    /// SD3: negative prompt for the T5 text encoder (default: `negative_prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt_3: Option<String>,
    /// SD3, FLUX: T5 tokens the prompt is padded or truncated to (diffusers' default 256 for SD3,
    /// 512 for FLUX; at most 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 512))]
    pub max_sequence_length: Option<u32>,
    /// Number of denoising steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; values <= 1 turn guidance (and the negative pass) off.
    /// FLUX.1-dev: the guidance value embedded in the transformer (distilled guidance, default
    /// 3.5; one pass whatever its value); FLUX.1-schnell has no guidance embedding and ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub guidance_scale: Option<f64>,
    /// FLUX: diffusers' `true_cfg_scale` (default 1.0): above 1 and with a `negative_prompt`, two
    /// transformer passes per step (the prompt's and the negative prompt's, each of batch 1),
    /// combined as classifier-free guidance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub true_cfg_scale: Option<f64>,
    /// Seed of the CPU generator that draws the initial latents, as `torch.Generator("cpu").manual_seed(seed)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub seed: Option<u64>,
    /// Image width in pixels, a multiple of 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 16384), extend("multipleOf" = 8))]
    pub width: Option<u32>,
    /// Image height in pixels, a multiple of 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 16384), extend("multipleOf" = 8))]
    pub height: Option<u32>,
    /// Images per prompt (diffusers' `num_images_per_prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub batch: Option<u32>,
    /// Skip this many final CLIP layers for the prompt embeddings (diffusers' `clip_skip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub clip_skip: Option<u32>,
    /// Exact initial latents (unscaled, `[batch, channels, height/8, width/8]`) from a
    /// `.safetensors` file instead of drawing them from `seed`; relative to the manifest file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub latents: Option<PathBuf>,
    /// Image-to-image (and inpainting, with `mask_image`): the input image, PNG, JPEG or WebP,
    /// relative to the manifest file (in a prompts file, to that file). RGBA and grayscale are
    /// read as RGB with the alpha dropped, as diffusers' `load_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<PathBuf>,
    /// How far `image` is noised before denoising, in (0, 1]: about `strength × steps` steps run
    /// (diffusers' `strength`; default per pipeline as diffusers: SD 0.8, SD inpainting 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: the mask, white where the image is repainted, black where it is kept; relative
    /// like `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub mask_image: Option<PathBuf>,
    /// This run's scales of live adapters (`fuse = false`) by name, over their `scale`
    /// (diffusers' `set_adapters` weights); from `--set`, prompt-file lines and `serve` requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_scales: Option<BTreeMap<String, f64>>,
    /// SDXL micro-conditioning `original_size` as `[height, width]` (default: the output size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<[u32; 2]>,
    /// SDXL micro-conditioning `crops_coords_top_left` as `[top, left]` (default: `[0, 0]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crops_coords_top_left: Option<[u32; 2]>,
    /// SDXL micro-conditioning `target_size` as `[height, width]` (default: the output size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<[u32; 2]>,
    /// Where to write the PNG, relative to the manifest file (default: `<name>.png`). With
    /// `batch > 1`, images are numbered `<stem>-0.png`, `<stem>-1.png`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub output: Option<PathBuf>,
    /// libtorch CPU threads (default: libtorch's own choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub threads: Option<u32>,
}
