//! PNG output: 8-bit RGB with tEXt/iTXt metadata, written to a temp file and renamed into place.

use std::path::Path;

use tch::{Kind, Tensor};

/// diffusers' quantisation (`numpy_to_pil`): `(image * 255).round().astype("uint8")` of a
/// [H, W, 3] float image in [0, 1].
pub fn to_rgb8(image: &Tensor) -> (u32, u32, Vec<u8>) {
    let img = (image.to_kind(Kind::Float) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).contiguous().to_device(tch::Device::Cpu);
    let (h, w, _) = img.size3().expect("[H, W, 3]");
    let n = (h * w * 3) as usize;
    let mut data = vec![0u8; n];
    img.copy_data_u8(&mut data, n);
    (w as u32, h as u32, data)
}

/// Writes `path` (atomically for a regular file, in place for a device or FIFO; see
/// [`crate::fsutil::write_file`]) with `text`: Latin-1 text as tEXt chunks, anything else (a curly
/// apostrophe, CJK, emoji) as UTF-8 iTXt chunks, as the PNG specification asks; NUL as `\0`.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8], text: &[(&str, String)]) -> std::io::Result<()> {
    let bytes = encode_png(width, height, rgb, text)?;
    crate::fsutil::write_file(path, |w| w.write_all(&bytes))
}

/// The PNG file's bytes (encoded before any file is touched, so an encoding error writes nothing).
pub fn encode_png(width: u32, height: u32, rgb: &[u8], text: &[(&str, String)]) -> std::io::Result<Vec<u8>> {
    let mut out = vec![];
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        // The specification forbids NUL in text chunks (readers stop at it): written as the two
        // characters `\0`; the exact text stays in the `runner` chunk's JSON (`\u0000`).
        let v = &v.replace('\0', "\\0");
        let latin1 = v.chars().all(|c| (c as u32) < 256);
        if latin1 {
            enc.add_text_chunk(k.to_string(), v.clone()).map_err(std::io::Error::other)?;
        } else {
            enc.add_itxt_chunk(k.to_string(), v.clone()).map_err(std::io::Error::other)?;
        }
    }
    let mut w = enc.write_header().map_err(std::io::Error::other)?;
    w.write_image_data(rgb).map_err(std::io::Error::other)?;
    w.finish().map_err(std::io::Error::other)?;
    Ok(out)
}

/// Writes a flat `name -> f32/i64 tensor` map as one safetensors file (for `--dump`), atomically.
pub fn write_dump(path: &Path, tensors: &[(String, Tensor)]) -> std::io::Result<()> {
    use crate::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};
    let mut infos = vec![];
    let mut data: Vec<u8> = vec![];
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let (dtype, t) = match t.kind() {
            Kind::Int64 | Kind::Int => (Dtype::I64, t.to_kind(Kind::Int64)),
            _ => (Dtype::F32, t.to_kind(Kind::Float)),
        };
        let numel = t.numel();
        let n = numel * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; n];
        t.copy_data_u8(&mut buf, numel);
        let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
        infos.push(TensorInfo { name: name.clone(), dtype, shape, data_offsets: (data.len() as u64, (data.len() + n) as u64) });
        data.extend(buf);
    }
    let header = encode_header(&infos, &Default::default());
    crate::fsutil::write_file(path, |w| {
        w.write_all(&header)?;
        w.write_all(&data)
    })
}

/// What one image was made from: enough to make it again.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageMeta {
    pub version: String,
    pub prompt: String,
    pub negative_prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_2: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_prompt_2: Option<String>,
    /// SD3: T5's texts and token count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_3: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_prompt_3: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<usize>,
    /// FLUX's true classifier-free guidance scale, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub true_cfg_scale: Option<f64>,
    /// The generator's seed (the batch's: its images come from one draw), or none with `latents`.
    pub seed: Option<u64>,
    /// This image's place in its batch (`run.batch`); the batch's other images share the seed.
    pub batch_index: usize,
    pub batch_size: usize,
    /// `run.latents` instead of a seed: the file and its sha256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents: Option<(String, String)>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: String,
    /// The scheduler as A1111 names its samplers (`Euler a`, `DPM++ 2M Karras`).
    pub sampler: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    pub width: u64,
    pub height: u64,
    /// The pipeline folder's name.
    pub model: String,
    /// sha256 of MANIFEST.lock when the run was `--locked` (every file the manifest reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_sha256: Option<String>,
    pub dtype: String,
    /// sha256 of the effective manifest (after environment variables and `--set`), as JSON.
    pub manifest_sha256: String,
    /// `[adapters.*]` merged into the weights, in name order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterMeta>,
    /// Image-to-image / inpainting: the input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<InitMeta>,
}

/// The input of an image-to-image or inpainting run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitMeta {
    /// sha256 of the input image's bytes, and its pixel size (width, height).
    pub image_sha256: String,
    pub image_size: (u32, u32),
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_sha256: Option<String>,
    pub strength: f64,
}

/// One LoRA adapter of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterMeta {
    pub name: String,
    pub scale: f64,
    /// The file's name.
    pub file: String,
    /// sha256 of the whole file.
    pub sha256: String,
    /// A1111's LoRA hash (sha256 of the data after the safetensors header; its `Lora hashes` show 12 digits).
    pub a1111_hash: String,
}

/// Longest text stored per field; the model sees 77 tokens of a prompt anyway.
pub const MAX_STORED_CHARS: usize = 2000;

/// `text` capped at [`MAX_STORED_CHARS`], saying what was left out.
pub fn capped(text: &str) -> String {
    let n = text.chars().count();
    if n <= MAX_STORED_CHARS {
        return text.to_string();
    }
    format!("{} ... [{n} characters in all; the text encoder saw only its first 77 tokens]", text.chars().take(MAX_STORED_CHARS).collect::<String>())
}

impl ImageMeta {
    /// The PNG text chunks: `parameters` in A1111's format (read by image viewers, galleries and
    /// civitai), `runner` as JSON with every value, `Software`. Plain `prompt` is left out: ComfyUI
    /// keeps its graph as JSON under that key and its readers parse it as such.
    pub fn chunks(&self) -> Vec<(&'static str, String)> {
        let quote = |s: &str| if s.contains([',', ':', '"', '\n']) { serde_json::to_string(s).unwrap_or_default() } else { s.to_string() };
        let mut fields = vec![format!("Steps: {}", self.steps), format!("Sampler: {}", self.sampler), format!("CFG scale: {}", self.guidance_scale)];
        match (&self.latents, self.seed) {
            (Some((path, sha)), _) => fields.push(format!("Latents: {}", quote(&format!("{path} (sha256 {sha})")))),
            (None, Some(seed)) => fields.push(format!("Seed: {seed}")),
            (None, None) => {}
        }
        fields.push(format!("Size: {}x{}", self.width, self.height));
        fields.push(format!("Model: {}", quote(&self.model)));
        if let Some(k) = self.clip_skip {
            fields.push(format!("Clip skip: {}", k + 1)); // A1111 counts the last layer as 1
        }
        if self.batch_size > 1 {
            fields.push(format!("Batch size: {}, Batch pos: {}", self.batch_size, self.batch_index));
        }
        if let Some(i) = &self.init {
            fields.push(format!("Denoising strength: {}", i.strength));
            fields.push(format!("Init image hash: {}", &i.image_sha256[..12.min(i.image_sha256.len())]));
        }
        if !self.adapters.is_empty() {
            let hashes: Vec<String> = self.adapters.iter().map(|a| format!("{}: {}", a.name, &a.a1111_hash[..12.min(a.a1111_hash.len())])).collect();
            fields.push(format!("Lora hashes: {}", serde_json::to_string(&hashes.join(", ")).unwrap_or_default()));
        }
        fields.push(format!("Version: runner {}", self.version));
        let mut parameters = capped(&self.prompt);
        if !self.negative_prompt.is_empty() {
            parameters.push_str(&format!("\nNegative prompt: {}", capped(&self.negative_prompt)));
        }
        parameters.push('\n');
        parameters.push_str(&fields.join(", "));
        let mut json = self.clone();
        for s in [&mut json.prompt, &mut json.negative_prompt] {
            *s = capped(s);
        }
        for s in [&mut json.prompt_2, &mut json.negative_prompt_2, &mut json.prompt_3, &mut json.negative_prompt_3].into_iter().flatten() {
            *s = capped(s);
        }
        vec![("parameters", parameters), ("runner", serde_json::to_string(&json).unwrap_or_default()), ("Software", format!("runner {}", self.version))]
    }
}

/// A1111's sampler name for a scheduler.
pub fn a1111_sampler(class: &str, karras: bool) -> String {
    let base = match class {
        "EulerDiscreteScheduler" => "Euler",
        "EulerAncestralDiscreteScheduler" => "Euler a",
        "DDIMScheduler" => "DDIM",
        "PNDMScheduler" => "PLMS",
        "DPMSolverMultistepScheduler" => "DPM++ 2M",
        "LMSDiscreteScheduler" => "LMS",
        other => other,
    };
    if karras {
        format!("{base} Karras")
    } else {
        base.to_string()
    }
}
