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
/// apostrophe, CJK, emoji) as UTF-8 iTXt chunks, as the PNG specification asks.
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
