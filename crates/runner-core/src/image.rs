//! Input images for image-to-image and inpainting, read as diffusers 0.42 reads them: `load_image`
//! (PIL's `Image.open(...).convert("RGB")`: alpha dropped, not composited; grayscale replicated),
//! then `VaeImageProcessor`'s PIL resize with the Lanczos filter. The resize is Pillow's own
//! 8-bit two-pass convolution (`libImaging/Resample.c`: coefficients in 22-bit fixed point,
//! horizontal pass first over the rows the vertical pass reads, each rounded to 8 bits), so the
//! pixels equal PIL's, not another Lanczos's; the safety checker's `CLIPImageProcessor`
//! (src/models/image_processor.rs) resizes with it too, with its other filters.
//!
//! The header is read before anything is decoded: an image whose width × height is over
//! [`MAX_PIXELS`] (PIL's decompression-bomb limit) is refused without allocating its pixels.

use std::path::Path;

/// PIL's `Image.MAX_IMAGE_PIXELS`: larger images are refused before they are decoded.
pub const MAX_PIXELS: u64 = 89_478_485;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {msg}")]
    Format { what: String, msg: String },
    #[error("{what}: {width}x{height} is {} pixels, over the limit of {MAX_PIXELS} (a decompression bomb?): resize it first", *width as u64 * *height as u64)]
    TooLarge { what: String, width: u32, height: u32 },
}

/// An 8-bit image with `channels` interleaved samples per pixel (3: RGB, 1: grayscale).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// An image file's format and size, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: &'static str,
    pub width: u32,
    pub height: u32,
}

fn reader<'a>(bytes: &'a [u8], what: &str) -> Result<image::ImageReader<std::io::Cursor<&'a [u8]>>, ImageError> {
    let r = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Io { what: what.into(), source: e })?;
    match r.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => Ok(r),
        Some(f) => Err(ImageError::Format { what: what.into(), msg: format!("a {f:?} image: runner reads PNG, JPEG and WebP") }),
        None => Err(ImageError::Format { what: what.into(), msg: "not an image runner reads (PNG, JPEG or WebP)".into() }),
    }
}

/// The format and size of `bytes` from the header alone; over [`MAX_PIXELS`] is an error.
pub fn probe(bytes: &[u8], what: &str) -> Result<Probe, ImageError> {
    let r = reader(bytes, what)?;
    let format = match r.format() {
        Some(image::ImageFormat::Png) => "PNG",
        Some(image::ImageFormat::Jpeg) => "JPEG",
        _ => "WebP",
    };
    // A PNG's size is its first chunk's (IHDR): read here, so that a bomb's claim is refused
    // whatever follows it.
    let ihdr = (format == "PNG" && bytes.len() >= 24 && &bytes[12..16] == b"IHDR")
        .then(|| (u32::from_be_bytes(bytes[16..20].try_into().expect("4")), u32::from_be_bytes(bytes[20..24].try_into().expect("4"))));
    let (width, height) = match ihdr {
        Some(d) => d,
        None => r.into_dimensions().map_err(|e| ImageError::Format { what: what.into(), msg: format!("unreadable {format} header: {e}") })?,
    };
    if width == 0 || height == 0 {
        return Err(ImageError::Format { what: what.into(), msg: format!("a {width}x{height} image") });
    }
    if width as u64 * height as u64 > MAX_PIXELS {
        return Err(ImageError::TooLarge { what: what.into(), width, height });
    }
    Ok(Probe { format, width, height })
}

/// Reads a file's bytes (at most what an image under the limit can take: 1 GiB).
pub fn read_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let what = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| ImageError::Io { what: what.clone(), source: e })?;
    if !f.metadata().map_err(|e| ImageError::Io { what: what.clone(), source: e })?.is_file() {
        return Err(ImageError::Format { what, msg: "not a regular file".into() });
    }
    let mut bytes = vec![];
    f.take(1 << 30).read_to_end(&mut bytes).map_err(|e| ImageError::Io { what: what.clone(), source: e })?;
    Ok(bytes)
}

/// `bytes` decoded and converted to RGB as PIL's `convert("RGB")` converts what `Image.open`
/// gives: alpha dropped, gray replicated, a palette looked up, 16-bit samples' high byte
/// (PIL's `;16B` raw modes; 16-bit grayscale clipped at 255 as its `I;16` → `L` conversion).
pub fn decode_rgb(bytes: &[u8], what: &str) -> Result<Image, ImageError> {
    use image::DynamicImage as D;
    let p = probe(bytes, what)?;
    let mut r = reader(bytes, what)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(p.width);
    limits.max_image_height = Some(p.height);
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    r.limits(limits);
    let img = r.decode().map_err(|e| ImageError::Format { what: what.into(), msg: format!("cannot decode the {} image (truncated or corrupt?): {e}", p.format) })?;
    let (width, height) = (img.width(), img.height());
    let n = width as usize * height as usize;
    let mut data = Vec::with_capacity(n * 3);
    let gray = |data: &mut Vec<u8>, v: &mut dyn Iterator<Item = u8>| v.for_each(|g| data.extend_from_slice(&[g, g, g]));
    match img {
        D::ImageRgb8(i) => data = i.into_raw(),
        D::ImageRgba8(i) => i.pixels().for_each(|p| data.extend_from_slice(&p.0[..3])),
        D::ImageLuma8(i) => gray(&mut data, &mut i.pixels().map(|p| p.0[0])),
        D::ImageLumaA8(i) => gray(&mut data, &mut i.pixels().map(|p| p.0[0])),
        D::ImageRgb16(i) => i.pixels().for_each(|p| data.extend(p.0.iter().map(|v| (v >> 8) as u8))),
        D::ImageRgba16(i) => i.pixels().for_each(|p| data.extend(p.0[..3].iter().map(|v| (v >> 8) as u8))),
        D::ImageLuma16(i) => gray(&mut data, &mut i.pixels().map(|p| p.0[0].min(255) as u8)),
        D::ImageLumaA16(i) => gray(&mut data, &mut i.pixels().map(|p| (p.0[0] >> 8) as u8)),
        other => return Err(ImageError::Format { what: what.into(), msg: format!("an image of {:?} samples: runner reads 8- and 16-bit images", other.color()) }),
    }
    Ok(Image { width, height, channels: 3, data })
}

/// [`decode_rgb`] of a file.
pub fn read_rgb(path: &Path) -> Result<Image, ImageError> {
    decode_rgb(&read_file(path)?, &path.display().to_string())
}

impl Image {
    /// PIL's `convert("L")` of an RGB image: ITU-R 601-2 luma in 16-bit fixed point
    /// (`(R·19595 + G·38470 + B·7471 + 0x8000) >> 16`).
    pub fn to_gray(&self) -> Image {
        if self.channels == 1 {
            return self.clone();
        }
        let data = self.data.chunks_exact(self.channels).map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8).collect();
        Image { width: self.width, height: self.height, channels: 1, data }
    }

    /// PIL's `resize((width, height), resample=LANCZOS)`: a copy when the size is the same.
    pub fn resize_lanczos(&self, width: u32, height: u32) -> Image {
        let data = resample(&self.data, self.channels, (self.width as usize, self.height as usize), (width as usize, height as usize), Resample::Lanczos);
        Image { width, height, channels: self.channels, data }
    }
}

/// Pillow's resampling filters (`PIL.Image.Resampling`) that `ImagingResample` implements.
/// NEAREST (0) goes through an affine transform in Pillow and is not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    /// From a config's `resample` integer (`PILImageResampling`).
    pub fn from_pil(n: i64) -> Option<Resample> {
        Some(match n {
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// `struct filter` support (Resample.c).
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// The filter functions of Resample.c, same operation order.
    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // `0.54f + 0.46f * cos(x)`: float literals promoted to double.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Resample::Bicubic => {
                // a = -0.5
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// PIL's `PRECISION_BITS` (Resample.c): 32 - 8 - 2.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resample.c `precompute_coeffs` followed by `normalize_coeffs_8bpc`: per output pixel, the
/// first input index, the tap count and `ksize` fixed-point coefficients.
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Resample) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        let mut ww = 0.0;
        // C `(int)` casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xmax = xmax.clamp(0, ksize as i64) as usize;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            for kx in k.iter_mut().take(xmax) {
                *kx /= ww;
            }
        }
        for (x, &kx) in k.iter().enumerate().take(xmax) {
            let f = kx * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if kx < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin as usize, xmax));
    }
    (ksize, bounds, kk)
}

/// `clip8`: the accumulator's integer part, clamped to a byte (Resample.c's lookup table).
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((width, height), resample)` of 8-bit `data` with `channels` interleaved
/// samples (no `box`, no `reducing_gap`): `ImagingResampleInner`, each pass only where that
/// dimension changes, the horizontal one over the rows the vertical one reads.
pub fn resample(data: &[u8], channels: usize, (in_w, in_h): (usize, usize), (width, height): (usize, usize), filter: Resample) -> Vec<u8> {
    let c = channels;
    if (in_w, in_h) == (width, height) {
        return data.to_vec();
    }
    let (ksize_v, mut bounds_v, kk_v) = precompute_coeffs(in_h, 0.0, in_h as f32, height, filter);
    let half = 1i64 << (PRECISION_BITS - 1);
    let (mut cur, mut cur_w) = (data.to_vec(), in_w);
    if width != in_w {
        let ybox_first = bounds_v[0].0;
        let ybox_last = bounds_v[height - 1].0 + bounds_v[height - 1].1;
        for b in bounds_v.iter_mut() {
            b.0 -= ybox_first;
        }
        let (ksize, bounds, kk) = precompute_coeffs(in_w, 0.0, in_w as f32, width, filter);
        let rows = ybox_last - ybox_first;
        let mut out = vec![0u8; rows * width * c];
        for yy in 0..rows {
            let line = &data[(yy + ybox_first) * in_w * c..(yy + ybox_first + 1) * in_w * c];
            for (xx, &(xmin, xmax)) in bounds.iter().enumerate() {
                let k = &kk[xx * ksize..xx * ksize + xmax];
                for ch in 0..c {
                    let ss = k.iter().enumerate().fold(half, |ss, (x, &kx)| ss + line[(x + xmin) * c + ch] as i64 * kx as i64);
                    out[(yy * width + xx) * c + ch] = clip8(ss);
                }
            }
        }
        (cur, cur_w) = (out, width);
    }
    if height != in_h {
        let w = cur_w;
        let mut out = vec![0u8; height * w * c];
        for (yy, &(ymin, ymax)) in bounds_v.iter().enumerate() {
            let k = &kk_v[yy * ksize_v..yy * ksize_v + ymax];
            for xx in 0..w {
                for ch in 0..c {
                    let ss = k.iter().enumerate().fold(half, |ss, (y, &ky)| ss + cur[((y + ymin) * w + xx) * c + ch] as i64 * ky as i64);
                    out[(yy * w + xx) * c + ch] = clip8(ss);
                }
            }
        }
        cur = out;
    }
    cur
}

/// diffusers' `VaeImageProcessor` output of an RGB image: NCHW floats `2·(v / 255) − 1` in
/// [-1, 1] (`pil_to_numpy`'s float32 division, then `normalize`), batch 1, as `[3, h, w]`.
pub fn to_normalized_chw(img: &Image) -> Vec<f32> {
    let (w, h, c) = (img.width as usize, img.height as usize, img.channels);
    let mut out = vec![0f32; c * h * w];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let v = img.data[(y * w + x) * c + ch] as f32 / 255.0f32;
                out[ch * h * w + y * w + x] = 2.0f32 * v - 1.0f32;
            }
        }
    }
    out
}

/// The mask processor's output (`do_normalize=False, do_binarize=True,
/// do_convert_grayscale=True`): 1 where `v / 255 >= 0.5` (repaint), else 0, as `[h, w]`.
pub fn to_binary_mask(gray: &Image) -> Vec<f32> {
    gray.data.iter().map(|&v| if (v as f32 / 255.0f32) < 0.5 { 0.0 } else { 1.0 }).collect()
}

/// `p`'s sha256, hex (provenance of input images).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(depth);
        e.write_header().unwrap().write_image_data(data).unwrap();
        out
    }

    #[test]
    fn rgba_drops_alpha_and_gray_replicates() {
        let rgba = png(1, 2, png::ColorType::Rgba, png::BitDepth::Eight, &[10, 20, 30, 0, 40, 50, 60, 255]);
        assert_eq!(decode_rgb(&rgba, "x").unwrap().data, [10, 20, 30, 40, 50, 60]);
        let gray = png(2, 1, png::ColorType::Grayscale, png::BitDepth::Eight, &[7, 200]);
        assert_eq!(decode_rgb(&gray, "x").unwrap().data, [7, 7, 7, 200, 200, 200]);
        let rgb16 = png(1, 1, png::ColorType::Rgb, png::BitDepth::Sixteen, &[0x12, 0x34, 0xab, 0xcd, 0xff, 0x00]);
        assert_eq!(decode_rgb(&rgb16, "x").unwrap().data, [0x12, 0xab, 0xff]);
    }

    #[test]
    fn a_bomb_header_is_refused_before_decoding() {
        // A PNG header claiming 100000 x 100000 pixels and no data.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        bytes.extend_from_slice(&13u32.to_be_bytes());
        bytes.extend_from_slice(&ihdr);
        let crc = crc32(&ihdr);
        bytes.extend_from_slice(&crc.to_be_bytes());
        let e = decode_rgb(&bytes, "big.png").unwrap_err().to_string();
        assert!(e.contains("big.png") && e.contains("100000x100000") && e.contains("decompression bomb"), "{e}");
        assert!(decode_rgb(b"not an image", "t.txt").unwrap_err().to_string().contains("PNG, JPEG or WebP"));
        let ok = png(4, 4, png::ColorType::Rgb, png::BitDepth::Eight, &[9; 48]);
        let e = decode_rgb(&ok[..ok.len() - 20], "cut.png").unwrap_err().to_string();
        assert!(e.contains("cut.png") && e.contains("truncated"), "{e}");
    }

    fn crc32(b: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    /// Pillow's `resize(size, LANCZOS)` of RGB and L images, down, up and mixed
    /// (tools/make_references_img2img.py): equal byte for byte.
    #[test]
    fn lanczos_resize_equals_pillows() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
        let rgb = read_rgb(&dir.join("lanczos-in.png")).unwrap();
        let gray = read_rgb(&dir.join("lanczos-in-gray.png")).unwrap().to_gray();
        for (w, h) in [(16, 8), (64, 40), (37, 23), (24, 23), (37, 64), (9, 5)] {
            assert_eq!(rgb.resize_lanczos(w, h), read_rgb(&dir.join(format!("lanczos-{w}x{h}.png"))).unwrap(), "RGB to {w}x{h}");
            assert_eq!(gray.resize_lanczos(w, h), read_rgb(&dir.join(format!("lanczos-gray-{w}x{h}.png"))).unwrap().to_gray(), "L to {w}x{h}");
        }
    }

    #[test]
    fn luma_is_pils() {
        let img = Image { width: 2, height: 1, channels: 3, data: vec![255, 0, 0, 12, 200, 90] };
        // PIL: Image.new("RGB", ...).convert("L") gives 76 and 131 for these.
        assert_eq!(img.to_gray().data, [76, 131]);
    }
}
