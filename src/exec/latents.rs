//! Initial latents given as data rather than a file: `runner serve`'s `latents`, a safetensors
//! file's bytes (base64 in the request body). Checked whole before the job waits in the queue:
//! one tensor (or one named `latents`), a floating-point dtype libtorch holds, the job's shape.
//! The errors name the request's field and what it holds, never a path of the server's.

use std::path::Path;

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::checkpoint::safetensors::{parse_file_bytes, Dtype};

/// Validated latents: the tensor's raw little-endian bytes, its dtype and shape, and the sha256
/// of the safetensors data they came in (for the PNG's metadata, as a file's would be).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentsData {
    dtype: Dtype,
    shape: Vec<i64>,
    data: Vec<u8>,
    pub sha256: String,
}

/// What the PNG's metadata names as the latents' source (a file's name otherwise).
pub const SOURCE: &str = "request";

impl LatentsData {
    /// Checks safetensors bytes against the job's latent shape `want`
    /// ([batch, channels, height/8, width/8]).
    pub fn from_safetensors(bytes: &[u8], want: &[u64; 4]) -> Result<LatentsData, String> {
        // The "path" in the parser's messages: the field, not a file.
        let header = parse_file_bytes(Path::new("latents"), bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
        let t = match header.get("latents") {
            Some(t) => t,
            None if header.tensors.len() == 1 => &header.tensors[0],
            None => return Err(format!("holds {} tensors: send one, or name the latents `latents`", header.tensors.len())),
        };
        if kind_of(t.dtype).is_none() {
            return Err(format!("tensor `{}` is {}: latents must be F32, F16, BF16 or F64", t.name, t.dtype));
        }
        if t.shape != want {
            return Err(format!("tensor `{}` has shape {:?}, the job needs {want:?} ([batch, channels, height/8, width/8])", t.name, t.shape));
        }
        let start = (header.data_start + t.data_offsets.0) as usize;
        let end = (header.data_start + t.data_offsets.1) as usize;
        let data = bytes[start..end].to_vec();
        let values = data.len() as u64 * 8 / t.dtype.bits();
        let sha256 = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let shape = t.shape.iter().map(|&d| d as i64).collect();
        let latents = LatentsData { dtype: t.dtype, shape, data, sha256 };
        // NaN or infinite latents make a black image at the cost of a whole generation.
        let finite = latents.tensor().isfinite().all().int64_value(&[]) != 0;
        if !finite {
            return Err(format!("tensor `{}` holds values that are not finite (NaN or infinity) among its {values}", t.name));
        }
        Ok(latents)
    }

    /// The latents as `run.latents` loads a file's: f32 on the CPU.
    pub fn tensor(&self) -> Tensor {
        let kind = kind_of(self.dtype).expect("checked in from_safetensors");
        Tensor::from_data_size(&self.data, &self.shape, kind).to_kind(Kind::Float)
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape
    }
}

fn kind_of(d: Dtype) -> Option<Kind> {
    match d {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::safetensors::{encode_header, TensorInfo};

    fn file(name: &str, dtype: Dtype, shape: &[u64], data: &[u8]) -> Vec<u8> {
        let t = TensorInfo { name: name.into(), dtype, shape: shape.to_vec(), data_offsets: (0, data.len() as u64) };
        let mut out = encode_header(&[t], &Default::default());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn latents_data_are_checked_whole() {
        let want = [1, 4, 1, 1];
        let f32s: Vec<u8> = [0.5f32, -1.0, 2.0, 0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        let ok = LatentsData::from_safetensors(&file("x", Dtype::F32, &[1, 4, 1, 1], &f32s), &want).unwrap();
        assert_eq!(Vec::<f32>::try_from(&ok.tensor().flatten(0, -1)).unwrap(), vec![0.5, -1.0, 2.0, 0.25]);
        let f16s: Vec<u8> = [0x3800u16, 0xbc00, 0x4000, 0x3400].iter().flat_map(|v| v.to_le_bytes()).collect();
        let half = LatentsData::from_safetensors(&file("latents", Dtype::F16, &[1, 4, 1, 1], &f16s), &want).unwrap();
        assert!(half.tensor().equal(&ok.tensor()));
        for (bytes, needle) in [
            (file("x", Dtype::F32, &[1, 4, 2, 1], &[f32s.clone(), f32s.clone()].concat()), "shape"),
            (file("x", Dtype::I32, &[1, 4, 1, 1], &f32s), "F32, F16"),
            (file("x", Dtype::F32, &[1, 4, 1, 1], &[0u8; 16]).iter().copied().chain([0u8]).collect(), "safetensors"),
            (b"root:x:0:0:root:/root:/bin/bash\n".to_vec(), "safetensors"),
            (vec![], "safetensors"),
            (file("x", Dtype::F32, &[1, 4, 1, 1], &[f32s[..12].to_vec(), f32::NAN.to_le_bytes().to_vec()].concat()), "not finite"),
        ] {
            let e = LatentsData::from_safetensors(&bytes, &want).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
