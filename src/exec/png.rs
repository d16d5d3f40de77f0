//! PNG output: 8-bit RGB with tEXt metadata, written to a temp file and renamed into place.

use std::io::Write;
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

/// Writes `path` atomically (temp file beside it, then rename) with `text` as tEXt chunks.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8], text: &[(&str, String)]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone()).map_err(std::io::Error::other)?;
        }
        let mut w = enc.write_header().map_err(std::io::Error::other)?;
        w.write_image_data(rgb).map_err(std::io::Error::other)?;
        w.finish().map_err(std::io::Error::other)?;
        Ok::<(), std::io::Error>(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
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
    let mut bytes = encode_header(&infos, &Default::default());
    bytes.extend(data);
    let tmp = path.with_extension("safetensors.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    std::fs::rename(tmp, path)
}
