//! The safety checker's `feature_extractor`: transformers' `CLIPImageProcessor` as diffusers 0.42.1
//! calls it in `StableDiffusionPipeline.run_safety_checker`, i.e. on PIL images made by
//! `VaeImageProcessor.numpy_to_pil`. Without torchvision transformers 5.24 loads the class as
//! `CLIPImageProcessorPil` (`PilBackend` in image_processing_backends.py), which resizes with
//! Pillow; this module reproduces that path bit for bit:
//!
//! * `numpy_to_pil`: `(x * 255).round().astype("uint8")` in float32 (round half to even);
//! * `PilBackend.resize` (sizes from `get_resize_output_image_size` & co. in
//!   image_transforms.py / image_utils.py) through `PIL.Image.resize`, i.e. Pillow's
//!   `ImagingResample` (src/libImaging/Resample.c): separable convolution, horizontal then
//!   vertical pass, fixed-point coefficients and uint8 rounding/clamping after each pass;
//! * `center_crop` (zero padding when the image is smaller), `rescale` (float64 multiply, then
//!   float32) and `normalize` (float32), channels first.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ImageProcessorError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}`: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("CLIPImageProcessor: {0}")]
    Input(String),
    #[error("CLIPImageProcessor: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub use runner_core::image::Resample;

/// An 8-bit RGB image, rows of RGB triples: a PIL "RGB" image / numpy [H, W, 3] uint8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(height: usize, width: usize, data: Vec<u8>) -> Result<RgbImage, ImageProcessorError> {
        if data.len() != height * width * 3 {
            return Err(ImageProcessorError::Input(format!("{height}x{width} RGB image needs {} bytes, got {}", height * width * 3, data.len())));
        }
        Ok(RgbImage { height, width, data })
    }
}

/// `VaeImageProcessor.numpy_to_pil` on [B, H, W, 3] float images: `(x * 255).round()` in float32
/// (numpy rounds half to even), then uint8. Values outside [0, 1] (which the pipeline clamps
/// away before) saturate, NaN becomes 0, where numpy's cast would be undefined.
pub fn numpy_to_pil(images: &Tensor) -> Result<Vec<RgbImage>, ImageProcessorError> {
    let size = images.size();
    let [b, h, w, c] = size[..] else {
        return Err(ImageProcessorError::Input(format!("images must be [B, H, W, 3], got shape {size:?}")));
    };
    if c != 3 || b < 1 || h < 1 || w < 1 {
        return Err(ImageProcessorError::Input(format!("images must be [B, H, W, 3] with B, H, W > 0, got shape {size:?}")));
    }
    if !images.is_floating_point() {
        return Err(ImageProcessorError::Input(format!("images must be floats in [0, 1], got {:?}", images.kind())));
    }
    // `pt_to_numpy` casts to float32 first (`.float()`).
    let flat = images.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
    let v: Vec<f32> = Vec::<f32>::try_from(&flat)?;
    let per = (h * w * 3) as usize;
    Ok(v.chunks(per).map(|img| RgbImage { height: h as usize, width: w as usize, data: img.iter().map(|&x| (x * 255.0f32).round_ties_even().clamp(0.0, 255.0) as u8).collect() }).collect())
}

/// `PIL.Image.resize((width, height), resample)` of an RGB image (no `box`, no
/// `reducing_gap`): `ImagingResampleInner`, each pass only where that dimension changes.
pub fn pil_resize(img: &RgbImage, height: usize, width: usize, filter: Resample) -> Result<RgbImage, ImageProcessorError> {
    if height < 1 || width < 1 {
        return Err(ImageProcessorError::Input(format!("resize to {height}x{width}: height and width must be > 0")));
    }
    if img.data.len() != img.height * img.width * 3 {
        return Err(ImageProcessorError::Input(format!("{}x{} RGB image has {} bytes", img.height, img.width, img.data.len())));
    }
    if (img.height, img.width) == (height, width) {
        return Ok(img.clone());
    }
    let data = runner_core::image::resample(&img.data, 3, (img.width, img.height), (width, height), filter);
    Ok(RgbImage { height, width, data })
}

/// transformers' `center_crop` (image_transforms.py): offsets `(orig - crop) // 2`, zero padding
/// (centered, `ceil` on the leading side) where the image is smaller than the crop.
pub fn center_crop(img: &RgbImage, crop_h: usize, crop_w: usize) -> RgbImage {
    let (oh, ow, ch, cw) = (img.height as i64, img.width as i64, crop_h as i64, crop_w as i64);
    let mut top = (oh - ch).div_euclid(2);
    let mut left = (ow - cw).div_euclid(2);
    let (mut bottom, mut right) = (top + ch, left + cw);
    if top >= 0 && bottom <= oh && left >= 0 && right <= ow {
        let mut data = Vec::with_capacity(crop_h * crop_w * 3);
        for y in top..bottom {
            let row = (y * ow) as usize * 3;
            data.extend_from_slice(&img.data[row + left as usize * 3..row + right as usize * 3]);
        }
        return RgbImage { height: crop_h, width: crop_w, data };
    }
    // Pad into a canvas of max(crop, orig), then crop from it.
    let (nh, nw) = (ch.max(oh), cw.max(ow));
    let top_pad = (nh - oh + 1) / 2;
    let left_pad = (nw - ow + 1) / 2;
    top += top_pad;
    bottom += top_pad;
    left += left_pad;
    right += left_pad;
    let (y0, y1, x0, x1) = (top.max(0), bottom.min(nh), left.max(0), right.min(nw));
    let (h, w) = ((y1 - y0).max(0) as usize, (x1 - x0).max(0) as usize);
    let mut data = vec![0u8; h * w * 3];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            // Canvas coordinates back to the source image.
            let (sy, sx) = (y + y0 - top_pad, x + x0 - left_pad);
            if (0..oh).contains(&sy) && (0..ow).contains(&sx) {
                let s = ((sy * ow + sx) * 3) as usize;
                let d = ((y * w as i64 + x) * 3) as usize;
                data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
            }
        }
    }
    RgbImage { height: h, width: w, data }
}

/// The resize target of `PilBackend.resize`, from the config's `size` (a `SizeDict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeSize {
    /// `{"shortest_edge"}`: `get_resize_output_image_size(default_to_square=False)`.
    ShortestEdge(usize),
    /// `{"shortest_edge", "longest_edge"}`: `get_size_with_aspect_ratio`.
    ShortestLongest(usize, usize),
    /// `{"max_height", "max_width"}`: `get_image_size_for_max_height_width`.
    MaxHeightWidth(usize, usize),
    /// `{"height", "width"}`.
    HeightWidth(usize, usize),
}

impl ResizeSize {
    /// (height, width) after resizing an image of `height` x `width`.
    pub fn output_size(self, height: usize, width: usize) -> (usize, usize) {
        match self {
            ResizeSize::HeightWidth(h, w) => (h, w),
            ResizeSize::ShortestEdge(s) => {
                // get_resize_output_image_size: new_long = int(size * long / short).
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
            ResizeSize::ShortestLongest(s, max_size) => {
                // get_size_with_aspect_ratio((height, width), size, max_size)
                let (h, w) = (height, width);
                let mut size = s;
                let mut raw_size = None;
                let min_o = h.min(w) as f64;
                let max_o = h.max(w) as f64;
                if max_o / min_o * size as f64 > max_size as f64 {
                    let raw = max_size as f64 * min_o / max_o;
                    raw_size = Some(raw);
                    size = raw.round_ties_even() as usize;
                }
                if (h <= w && h == size) || (w <= h && w == size) {
                    (h, w)
                } else if w < h {
                    let oh = match raw_size {
                        Some(r) => (r * h as f64 / w as f64) as usize,
                        None => ((size * h) as f64 / w as f64) as usize,
                    };
                    (oh, size)
                } else {
                    let ow = match raw_size {
                        Some(r) => (r * w as f64 / h as f64) as usize,
                        None => ((size * w) as f64 / h as f64) as usize,
                    };
                    (size, ow)
                }
            }
            ResizeSize::MaxHeightWidth(mh, mw) => {
                let scale = (mh as f64 / height as f64).min(mw as f64 / width as f64);
                ((height as f64 * scale) as usize, (width as f64 * scale) as usize)
            }
        }
    }
}

/// `CLIPImageProcessor` (`CLIPImageProcessorPil`) as configured by a `preprocessor_config.json`,
/// with the class defaults for absent keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub do_resize: bool,
    pub size: ResizeSize,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// As the float32 arrays `normalize` builds.
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessor {
    /// `CLIPImageProcessorPil`'s class attributes.
    fn default() -> Self {
        ImageProcessor {
            do_resize: true,
            size: ResizeSize::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            // OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (Python floats), as float32.
            image_mean: [0.48145466f64 as f32, 0.4578275f64 as f32, 0.40821073f64 as f32],
            image_std: [0.26862954f64 as f32, 0.26130258f64 as f32, 0.27577711f64 as f32],
        }
    }
}

impl ImageProcessor {
    /// Reads `dir/preprocessor_config.json` (a pipeline's `feature_extractor` folder).
    pub fn from_folder(dir: &Path) -> Result<Self, ImageProcessorError> {
        let path = dir.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ImageProcessorError::Io { path: path.clone(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ImageProcessorError::Config { path: path.clone(), msg: format!("invalid JSON: {e}") })?;
        Self::from_json_at(&v, &path)
    }

    /// From a `preprocessor_config.json` value (errors shown as `preprocessor_config.json`).
    pub fn from_json(v: &Value) -> Result<Self, ImageProcessorError> {
        Self::from_json_at(v, Path::new("preprocessor_config.json"))
    }

    fn from_json_at(v: &Value, path: &Path) -> Result<Self, ImageProcessorError> {
        let err = |msg: String| ImageProcessorError::Config { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(err("expected a JSON object".into()));
        }
        let d = ImageProcessor::default();
        let present = |key: &str| v.get(key).filter(|x| !x.is_null());
        let boolean =
            |key: &str, default: bool| -> Result<bool, ImageProcessorError> { present(key).map_or(Ok(default), |x| x.as_bool().ok_or_else(|| err(format!("`{key}` must be a boolean, got {x}")))) };
        let positive = |key: &str, x: &Value| -> Result<usize, ImageProcessorError> {
            x.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| err(format!("`{key}` sizes must be positive integers, got {x}")))
        };
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3], ImageProcessorError> {
            let Some(x) = present(key) else { return Ok(default) };
            // A float is repeated per channel (`normalize`); a list needs one per channel.
            if let Some(f) = x.as_f64() {
                return Ok([f as f32; 3]);
            }
            let a = x.as_array().filter(|a| a.len() == 3).ok_or_else(|| err(format!("`{key}` must be a number or a list of 3 numbers, got {x}")))?;
            let mut out = [0f32; 3];
            for (o, e) in out.iter_mut().zip(a) {
                *o = e.as_f64().ok_or_else(|| err(format!("`{key}` must hold numbers, got {e}")))? as f32;
            }
            Ok(out)
        };
        let default_to_square = boolean("default_to_square", false)?;
        // get_size_dict: an int is a square or a shortest edge, a list (height, width), a dict
        // one of VALID_SIZE_DICT_KEYS.
        let size = match present("size") {
            None => d.size,
            Some(x @ Value::Number(_)) => {
                let s = positive("size", x)?;
                if default_to_square {
                    ResizeSize::HeightWidth(s, s)
                } else {
                    ResizeSize::ShortestEdge(s)
                }
            }
            Some(Value::Array(a)) if a.len() == 2 => ResizeSize::HeightWidth(positive("size", &a[0])?, positive("size", &a[1])?),
            Some(Value::Object(m)) => {
                let mut keys: Vec<&str> = m.iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k.as_str()).collect();
                keys.sort_unstable();
                let g = |k: &str| positive("size", &m[k]);
                match keys[..] {
                    ["shortest_edge"] => ResizeSize::ShortestEdge(g("shortest_edge")?),
                    ["longest_edge", "shortest_edge"] => ResizeSize::ShortestLongest(g("shortest_edge")?, g("longest_edge")?),
                    ["max_height", "max_width"] => ResizeSize::MaxHeightWidth(g("max_height")?, g("max_width")?),
                    ["height", "width"] => ResizeSize::HeightWidth(g("height")?, g("width")?),
                    _ => return Err(err(format!("`size` keys {keys:?} are not supported (shortest_edge; shortest_edge + longest_edge; max_height + max_width; height + width)"))),
                }
            }
            Some(x) => return Err(err(format!("`size` must be an integer, a [height, width] list or a dict, got {x}"))),
        };
        let crop_size = match present("crop_size") {
            None => d.crop_size,
            Some(x @ Value::Number(_)) => {
                let s = positive("crop_size", x)?;
                (s, s)
            }
            Some(Value::Array(a)) if a.len() == 2 => (positive("crop_size", &a[0])?, positive("crop_size", &a[1])?),
            Some(Value::Object(m)) => match (m.get("height"), m.get("width")) {
                (Some(h), Some(w)) => (positive("crop_size", h)?, positive("crop_size", w)?),
                _ => return Err(err(format!("`crop_size` must have `height` and `width`, got {}", Value::Object(m.clone())))),
            },
            Some(x) => return Err(err(format!("`crop_size` must be an integer, a [height, width] list or a dict, got {x}"))),
        };
        let resample = match present("resample") {
            None => d.resample,
            Some(x) => {
                let n = x.as_i64().ok_or_else(|| err(format!("`resample` must be an integer, got {x}")))?;
                Resample::from_pil(n).ok_or_else(|| err(format!("`resample` {n} is not supported (1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING)")))?
            }
        };
        let rescale_factor = match present("rescale_factor") {
            None => d.rescale_factor,
            Some(x) => x.as_f64().ok_or_else(|| err(format!("`rescale_factor` must be a number, got {x}")))?,
        };
        Ok(ImageProcessor {
            do_resize: boolean("do_resize", d.do_resize)?,
            size,
            resample,
            do_center_crop: boolean("do_center_crop", d.do_center_crop)?,
            crop_size,
            do_rescale: boolean("do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: boolean("do_normalize", d.do_normalize)?,
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
        })
    }

    /// `PilBackend.resize` with the configured size and filter (`do_resize` is not consulted).
    pub fn resize(&self, img: &RgbImage) -> Result<RgbImage, ImageProcessorError> {
        let (h, w) = self.size.output_size(img.height, img.width);
        pil_resize(img, h, w, self.resample)
    }

    /// (height, width) of `pixel_values` for an input of `height` x `width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (h, w) = if self.do_resize { self.size.output_size(height, width) } else { (height, width) };
        if self.do_center_crop {
            self.crop_size
        } else {
            (h, w)
        }
    }

    /// `PilBackend._preprocess` on uint8 RGB images: [B, 3, h, w] float32 `pixel_values` (CPU).
    pub fn preprocess_rgb(&self, images: &[RgbImage]) -> Result<Tensor, ImageProcessorError> {
        let mut out: Vec<f32> = vec![];
        let mut shape = None;
        for img in images {
            let mut img = if self.do_resize { self.resize(img)? } else { img.clone() };
            if self.do_center_crop {
                img = center_crop(&img, self.crop_size.0, self.crop_size.1);
            }
            if *shape.get_or_insert((img.height, img.width)) != (img.height, img.width) {
                return Err(ImageProcessorError::Input(format!("processed images differ in size ({:?} and {}x{}); they cannot be batched", shape.unwrap_or_default(), img.height, img.width)));
            }
            let n = img.height * img.width;
            let base = out.len();
            out.resize(base + 3 * n, 0.0);
            for (i, px) in img.data.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    // rescale: `image.astype(np.float64) * scale`, then `.astype(np.float32)`.
                    let mut x = if self.do_rescale { (px[c] as f64 * self.rescale_factor) as f32 } else { px[c] as f32 };
                    // normalize: `(image - mean) / std` in float32.
                    if self.do_normalize {
                        x = (x - self.image_mean[c]) / self.image_std[c];
                    }
                    out[base + c * n + i] = x;
                }
            }
        }
        let Some((h, w)) = shape else {
            return Err(ImageProcessorError::Input("no images".into()));
        };
        Ok(Tensor::from_slice(&out).f_view([images.len() as i64, 3, h as i64, w as i64])?)
    }

    /// The pipeline's `feature_extractor(numpy_to_pil(images), return_tensors="pt").pixel_values`
    /// for decoded images [B, H, W, 3] in [0, 1]: [B, 3, crop_h, crop_w] float32 on the CPU.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor, ImageProcessorError> {
        self.preprocess_rgb(&numpy_to_pil(images)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_follow_transformers() {
        let s = ResizeSize::ShortestEdge(224);
        assert_eq!(s.output_size(512, 512), (224, 224));
        assert_eq!(s.output_size(768, 512), (336, 224));
        assert_eq!(s.output_size(512, 777), (224, 339)); // int(224 * 777 / 512) = int(339.9375)
        assert_eq!(ResizeSize::ShortestLongest(224, 300).output_size(100, 400), (75, 300));
        assert_eq!(ResizeSize::MaxHeightWidth(50, 50).output_size(100, 200), (25, 50));
    }

    #[test]
    fn config_parsing_and_errors() {
        let p = ImageProcessor::from_json(&serde_json::json!({"size": 224, "crop_size": 224, "resample": 3})).unwrap();
        assert_eq!((p.size, p.crop_size), (ResizeSize::ShortestEdge(224), (224, 224)));
        let p = ImageProcessor::from_json(&serde_json::json!({"size": 64, "default_to_square": true, "image_mean": 0.5})).unwrap();
        assert_eq!((p.size, p.image_mean), (ResizeSize::HeightWidth(64, 64), [0.5; 3]));
        let e = ImageProcessor::from_json(&serde_json::json!({"resample": 0})).unwrap_err().to_string();
        assert!(e.contains("preprocessor_config.json") && e.contains("`resample` 0"), "{e}");
        let e = ImageProcessor::from_json(&serde_json::json!({"size": {"longest_edge": 3}})).unwrap_err().to_string();
        assert!(e.contains("`size` keys"), "{e}");
        let e = ImageProcessor::from_json(&serde_json::json!({"image_std": [1, 2]})).unwrap_err().to_string();
        assert!(e.contains("image_std"), "{e}");
        let e = ImageProcessor::from_json(&serde_json::json!({"crop_size": 0})).unwrap_err().to_string();
        assert!(e.contains("crop_size"), "{e}");
    }

    #[test]
    fn center_crop_pads_small_images_with_zeros() {
        let img = RgbImage::new(2, 3, (1..=18).collect()).unwrap();
        let c = center_crop(&img, 4, 1);
        // top = (2 - 4) // 2 = -1 -> padded canvas of 4 rows (1 above), column (3 - 1) // 2 = 1.
        assert_eq!((c.height, c.width), (4, 1));
        assert_eq!(c.data, vec![0, 0, 0, 4, 5, 6, 13, 14, 15, 0, 0, 0]);
        let c = center_crop(&img, 1, 1);
        assert_eq!(c.data, vec![4, 5, 6]);
    }

    #[test]
    fn resize_keeps_constant_images_and_identity() {
        let img = RgbImage::new(5, 7, [10u8, 200, 77].repeat(35)).unwrap();
        for f in [Resample::Bicubic, Resample::Bilinear, Resample::Lanczos, Resample::Box, Resample::Hamming] {
            let r = pil_resize(&img, 3, 11, f).unwrap();
            assert_eq!(r.data, [10u8, 200, 77].repeat(33), "{f:?}");
        }
        assert_eq!(pil_resize(&img, 5, 7, Resample::Bicubic).unwrap(), img);
        assert!(pil_resize(&img, 0, 7, Resample::Bicubic).is_err());
    }
}
