//! GGUF-quantized Linear weights, as diffusers 0.42's `GGUFLinear` runs them: the weight stays in
//! its ggml blocks (`U8` bytes of its byte shape: rows, then a row's bytes) on the host and on the
//! device, and each forward dequantizes it to the compute dtype and drops the copy after.
//!
//! The arithmetic is diffusers' `dequantize_gguf_tensor`: its scales stay fp16 and so do its
//! products. On the CPU the blocks are decoded in Rust ([`ggml::dequantize_as_diffusers`], value
//! for value diffusers'); elsewhere with diffusers' own tensor operations, in its order, so a GPU
//! rounds where diffusers' GPU run rounds.

use runner_core::checkpoint::ggml;
use runner_core::checkpoint::gguf::GgmlType;
use tch::{Device, Kind, TchError, Tensor};

/// A quantized weight's type and its own (torch-order) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant {
    pub ggml_type: GgmlType,
    pub shape: Vec<i64>,
}

/// `bytes` (a quantized weight's blocks) dequantized to `kind`: diffusers'
/// `dequantize_gguf_tensor(weight).to(compute_dtype)`.
pub fn dequantize(bytes: &Tensor, q: &Quant, kind: Kind) -> Result<Tensor, TchError> {
    let values = if bytes.device() == Device::Cpu { on_host(bytes, q)? } else { with_torch_ops(bytes, q.ggml_type)?.f_reshape(q.shape.as_slice())? };
    if values.kind() == kind {
        Ok(values)
    } else {
        values.f_to_kind(kind)
    }
}

thread_local! {
    /// The forward's dequantized weight on the CPU: float32 values, and their compute-dtype copy
    /// for a 16-bit compute dtype. Kept per thread and reused: a fresh allocation per layer call
    /// costs page faults (huge pages zeroed) of the whole model's weights per step.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<u16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// diffusers' `GGUFLinear.forward_native`: `x @ dequantize(weight).to(kind).T + bias.to(kind)`.
/// On the CPU the dequantized weight lives in a per-thread buffer for the call alone (it never
/// leaves this function); elsewhere it is a temporary of the device's allocator.
pub fn linear(x: &Tensor, bytes: &Tensor, q: &Quant, bias: Option<&Tensor>, kind: Kind) -> Result<Tensor, TchError> {
    let bias = bias.map(|b| b.f_to_kind(kind)).transpose()?;
    if bytes.device() != Device::Cpu || !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        return x.f_linear(&dequantize(bytes, q, kind)?, bias.as_ref());
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (wide, narrow) = &mut *s;
        let n = q.shape.iter().product::<i64>().max(0) as usize;
        if wide.len() < n {
            wide.resize(n, 0.0);
        }
        decode_into(bytes, q, &mut wide[..n])?;
        // SAFETY: the buffers hold `n` elements of the kinds given and outlive these views, which
        // are dropped before this closure returns (only `linear`'s output, a new tensor, leaves).
        let w32 = unsafe { Tensor::f_from_blob(wide.as_ptr() as *const u8, &q.shape, &[], Kind::Float, Device::Cpu)? };
        if kind == Kind::Float {
            return x.f_linear(&w32, bias.as_ref());
        }
        if narrow.len() < n {
            narrow.resize(n, 0);
        }
        let mut w16 = unsafe { Tensor::f_from_blob(narrow.as_ptr() as *const u8, &q.shape, &[], kind, Device::Cpu)? };
        w16.f_copy_(&w32)?;
        x.f_linear(&w16, bias.as_ref())
    })
}

/// Decoded in Rust: f32 values equal to diffusers' (fp16 ones where its result is fp16).
fn on_host(bytes: &Tensor, q: &Quant) -> Result<Tensor, TchError> {
    let out = Tensor::f_empty(q.shape.as_slice(), (Kind::Float, Device::Cpu))?;
    let n = out.numel();
    // SAFETY: `out` is a fresh contiguous CPU f32 tensor of `n` elements, alive for the borrow.
    decode_into(bytes, q, unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n) })?;
    Ok(out)
}

/// `bytes` (on the CPU) decoded into `dst` (exactly the tensor's values), chunks of blocks in parallel.
fn decode_into(bytes: &Tensor, q: &Quant, dst: &mut [f32]) -> Result<(), TchError> {
    use rayon::prelude::*;
    /// Elements decoded per task: a few pages of output, large enough to amortise the task.
    const CHUNK: usize = 1 << 15;
    let b = bytes.f_contiguous()?;
    let t = q.ggml_type;
    let (bs, ts) = (t.block_size() as usize, t.type_size() as usize);
    if b.numel() % ts != 0 || b.numel() / ts * bs != dst.len() {
        return Err(TchError::Convert(format!("{} bytes of {t} blocks do not hold a {:?} tensor", b.numel(), q.shape)));
    }
    let per = CHUNK.div_ceil(bs);
    // SAFETY: `b` is a contiguous CPU tensor of its numel bytes, alive for the borrow.
    let src = unsafe { std::slice::from_raw_parts(b.data_ptr() as *const u8, b.numel()) };
    src.par_chunks(per * ts).zip(dst.par_chunks_mut(per * bs)).try_for_each(|(s, d)| ggml::dequantize_as_diffusers_into(t, s, d)).map_err(TchError::Convert)
}

fn u8s(device: Device, v: &[u8], shape: &[i64]) -> Result<Tensor, TchError> {
    Tensor::from_slice(v).f_to_device(device)?.f_reshape(shape)
}

/// diffusers' `split_block_dims`: the blocks' columns cut at `sizes` (the rest last).
fn split(blocks: &Tensor, sizes: &[i64]) -> Result<Vec<Tensor>, TchError> {
    let mut out = vec![];
    let mut at = 0;
    for &s in sizes {
        out.push(blocks.f_narrow(1, at, s)?);
        at += s;
    }
    let n = blocks.size()[1];
    out.push(blocks.f_narrow(1, at, n - at)?);
    Ok(out)
}

/// `x.view(torch.float16)` of a block's two scale bytes: [n, 1] fp16.
fn f16(x: &Tensor) -> Result<Tensor, TchError> {
    x.f_contiguous()?.f_view_dtype(Kind::Half)
}

/// diffusers' `to_uint32`: four bytes as one int32 per block, [n, 1].
fn to_uint32(x: &Tensor) -> Result<Tensor, TchError> {
    let x = x.f_to_kind(Kind::Int)?;
    let b = |i: i64| x.f_select(1, i);
    b(0)?
        .f_bitwise_or_tensor(&b(1)?.f_bitwise_left_shift_tensor_scalar(8)?)?
        .f_bitwise_or_tensor(&b(2)?.f_bitwise_left_shift_tensor_scalar(16)?)?
        .f_bitwise_or_tensor(&b(3)?.f_bitwise_left_shift_tensor_scalar(24)?)?
        .f_unsqueeze(1)
}

/// diffusers' `get_scale_min` of the K-quants' 12 packed scale bytes: (scales, mins), [n, 8] u8.
fn scale_min(scales: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let n = scales.size()[0];
    let s = scales.f_reshape([n, 3, 4])?;
    let (d, m, md) = (s.f_narrow(1, 0, 1)?, s.f_narrow(1, 1, 1)?, s.f_narrow(1, 2, 1)?);
    let sc = Tensor::f_cat(&[d.f_bitwise_and(0x3F)?, md.f_bitwise_and(0x0F)?.f_bitwise_or_tensor(&d.f_bitwise_right_shift_tensor_scalar(2)?.f_bitwise_and(0x30)?)?], -1)?;
    let mn = Tensor::f_cat(&[m.f_bitwise_and(0x3F)?, md.f_bitwise_right_shift_tensor_scalar(4)?.f_bitwise_or_tensor(&m.f_bitwise_right_shift_tensor_scalar(2)?.f_bitwise_and(0x30)?)?], -1)?;
    Ok((sc.f_reshape([n, 8])?, mn.f_reshape([n, 8])?))
}

/// diffusers' `dequantize_functions[type](blocks)` on `bytes`, reshaped to blocks: fp16 results
/// (float32 for BF16 and the IQ4 lookups), [n_blocks, block_size].
pub fn with_torch_ops(bytes: &Tensor, t: GgmlType) -> Result<Tensor, TchError> {
    let dev = bytes.device();
    let (bs, ts) = (t.block_size() as i64, t.type_size() as i64);
    let n = bytes.numel() as i64 / ts;
    let blocks = bytes.f_reshape([n, ts])?;
    let shifts = |v: &[u8], shape: &[i64]| u8s(dev, v, shape);
    const QK_K: i64 = 256;
    match t {
        GgmlType::F32 => blocks.f_view_dtype(Kind::Float),
        GgmlType::F16 => blocks.f_view_dtype(Kind::Half),
        GgmlType::BF16 => blocks.f_view_dtype(Kind::BFloat16)?.f_to_kind(Kind::Float),
        GgmlType::Q8_0 => {
            let p = split(&blocks, &[2])?;
            f16(&p[0])?.f_mul(&p[1].f_contiguous()?.f_view_dtype(Kind::Int8)?)
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let p = split(&blocks, if t == GgmlType::Q4_0 { &[2] } else { &[2, 2] })?;
            let qs = p.last().expect("qs").f_reshape([n, -1, 1, bs / 2])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2, 1])?)?.f_bitwise_and(0x0F)?.f_reshape([n, -1])?;
            let d = f16(&p[0])?;
            if t == GgmlType::Q4_0 {
                d.f_mul(&qs.f_to_kind(Kind::Int8)?.f_sub_scalar(8)?)
            } else {
                d.f_mul(&qs)?.f_add(&f16(&p[1])?)
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let one = t == GgmlType::Q5_1;
            let p = split(&blocks, if one { &[2, 2, 4] } else { &[2, 4] })?;
            let (qh, qs) = (&p[p.len() - 2], &p[p.len() - 1]);
            let qh = to_uint32(qh)?.f_reshape([n, 1])?.f_bitwise_right_shift(&Tensor::f_arange(32, (Kind::Int, dev))?.f_reshape([1, 32])?)?;
            let ql = qs.f_reshape([n, -1, 1, bs / 2])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2, 1])?)?;
            let qh = qh.f_bitwise_and(1)?.f_to_kind(Kind::Uint8)?;
            let ql = ql.f_bitwise_and(0x0F)?.f_reshape([n, -1])?;
            let q = ql.f_bitwise_or_tensor(&qh.f_bitwise_left_shift_tensor_scalar(4)?)?;
            let d = f16(&p[0])?;
            if one {
                d.f_mul(&q)?.f_add(&f16(&p[1])?)
            } else {
                d.f_mul(&q.f_to_kind(Kind::Int8)?.f_sub_scalar(16)?)
            }
        }
        GgmlType::Q6_K => {
            let p = split(&blocks, &[QK_K / 2, QK_K / 4, QK_K / 16])?;
            let (ql, qh, scales, d) = (&p[0], &p[1], &p[2], &p[3]);
            let scales = scales.f_contiguous()?.f_view_dtype(Kind::Int8)?;
            let d = f16(d)?.f_mul(&scales)?.f_reshape([n, QK_K / 16, 1])?;
            let ql = ql.f_reshape([n, -1, 1, 64])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2, 1])?)?.f_bitwise_and(0x0F)?.f_reshape([n, -1, 32])?;
            let qh = qh.f_reshape([n, -1, 1, 32])?.f_bitwise_right_shift(&shifts(&[0, 2, 4, 6], &[1, 1, 4, 1])?)?.f_bitwise_and(0x03)?.f_reshape([n, -1, 32])?;
            let q = ql.f_bitwise_or_tensor(&qh.f_bitwise_left_shift_tensor_scalar(4)?)?.f_to_kind(Kind::Int8)?.f_sub_scalar(32)?.f_reshape([n, QK_K / 16, -1])?;
            d.f_mul(&q)?.f_reshape([n, QK_K])
        }
        GgmlType::Q5_K | GgmlType::Q4_K => {
            let five = t == GgmlType::Q5_K;
            let p = split(&blocks, if five { &[2, 2, 12, QK_K / 8] } else { &[2, 2, 12] })?;
            let (sc, m) = scale_min(&p[2])?;
            let d = f16(&p[0])?.f_mul(&sc)?.f_reshape([n, -1, 1])?;
            let dm = f16(&p[1])?.f_mul(&m)?.f_reshape([n, -1, 1])?;
            let qs = p.last().expect("qs");
            let ql = qs.f_reshape([n, -1, 1, 32])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2, 1])?)?.f_bitwise_and(0x0F)?.f_reshape([n, -1, 32])?;
            let q = if five {
                let qh = p[3].f_reshape([n, -1, 1, 32])?.f_bitwise_right_shift(&Tensor::f_arange(8, (Kind::Uint8, dev))?.f_reshape([1, 1, 8, 1])?)?.f_bitwise_and(0x01)?.f_reshape([n, -1, 32])?;
                ql.f_bitwise_or_tensor(&qh.f_bitwise_left_shift_tensor_scalar(4)?)?
            } else {
                ql
            };
            d.f_mul(&q)?.f_sub(&dm)?.f_reshape([n, QK_K])
        }
        GgmlType::Q3_K => {
            let p = split(&blocks, &[QK_K / 8, QK_K / 4, 12])?;
            let (hmask, qs, scales, d) = (&p[0], &p[1], &p[2], f16(&p[3])?);
            let l = scales.f_narrow(1, 0, 8)?.f_reshape([n, 1, 8])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 2, 1])?)?.f_reshape([n, 16])?;
            let h = scales.f_narrow(1, 8, 4)?.f_reshape([n, 1, 4])?.f_bitwise_right_shift(&shifts(&[0, 2, 4, 6], &[1, 4, 1])?)?.f_reshape([n, 16])?;
            let scales = l.f_bitwise_and(0x0F)?.f_bitwise_or_tensor(&h.f_bitwise_and(0x03)?.f_bitwise_left_shift_tensor_scalar(4)?)?.f_to_kind(Kind::Int8)?.f_sub_scalar(32)?;
            let dl = d.f_mul(&scales)?.f_reshape([n, 16, 1])?;
            let ql = qs.f_reshape([n, -1, 1, 32])?.f_bitwise_right_shift(&shifts(&[0, 2, 4, 6], &[1, 1, 4, 1])?)?.f_reshape([n, 16, QK_K / 16])?.f_bitwise_and(3)?;
            let qh = hmask
                .f_reshape([n, -1, 1, 32])?
                .f_bitwise_right_shift(&Tensor::f_arange(8, (Kind::Uint8, dev))?.f_reshape([1, 1, 8, 1])?)?
                .f_reshape([n, 16, QK_K / 16])?
                .f_bitwise_and(1)?
                .f_bitwise_xor(1)?;
            let q = ql.f_to_kind(Kind::Int8)?.f_sub(&qh.f_bitwise_left_shift_tensor_scalar(2)?.f_to_kind(Kind::Int8)?)?;
            dl.f_mul(&q)?.f_reshape([n, QK_K])
        }
        GgmlType::Q2_K => {
            let p = split(&blocks, &[QK_K / 16, QK_K / 4, 2])?;
            let (scales, qs, d, dmin) = (&p[0], &p[1], f16(&p[2])?, f16(&p[3])?);
            let dl = d.f_mul(&scales.f_bitwise_and(0xF)?)?.f_reshape([n, QK_K / 16, 1])?;
            let ml = dmin.f_mul(&scales.f_bitwise_right_shift_tensor_scalar(4)?)?.f_reshape([n, QK_K / 16, 1])?;
            let qs = qs.f_reshape([n, -1, 1, 32])?.f_bitwise_right_shift(&shifts(&[0, 2, 4, 6], &[1, 1, 4, 1])?)?.f_bitwise_and(3)?.f_reshape([n, QK_K / 16, 16])?;
            dl.f_mul(&qs)?.f_sub(&ml)?.f_reshape([n, -1])
        }
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
            let kvalues = Tensor::from_slice(&[-127f32, -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.]).f_to_device(dev)?;
            // `torch.gather(kvalues.expand(...), -1, q)`: a lookup of each 4-bit index.
            let lookup = |q: &Tensor| -> Result<Tensor, TchError> { kvalues.f_index_select(0, &q.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?.f_reshape(q.size().as_slice()) };
            if t == GgmlType::IQ4_NL {
                let p = split(&blocks, &[2])?;
                let qs = p[1].f_reshape([n, -1, 1, bs / 2])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2, 1])?)?.f_bitwise_and(15)?.f_reshape([n, -1])?;
                f16(&p[0])?.f_mul(&lookup(&qs)?)
            } else {
                let p = split(&blocks, &[2, 2, QK_K / 64])?;
                let d = f16(&p[0])?;
                let sh = p[1].f_contiguous()?.f_view_dtype(Kind::Int16)?;
                let sl = p[2].f_reshape([n, -1, 1])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2])?)?;
                let sh = sh.f_reshape([n, 1, -1])?.f_bitwise_right_shift(&shifts(&[0, 2, 4, 6, 8, 10, 12, 14], &[1, -1, 1])?)?;
                let sl = sl.f_reshape([n, -1])?.f_bitwise_and(0x0F)?;
                let sh = sh.f_reshape([n, -1])?.f_bitwise_and(0x03)?;
                let scales = sl.f_bitwise_or_tensor(&sh.f_bitwise_left_shift_tensor_scalar(4)?)?.f_sub_scalar(32)?;
                let dl = d.f_mul(&scales)?.f_reshape([n, -1, 1])?;
                let qs = p[3].f_reshape([n, -1, 1, 16])?.f_bitwise_right_shift(&shifts(&[0, 4], &[1, 1, 2, 1])?)?.f_bitwise_and(15)?.f_reshape([n, -1, 32])?;
                dl.f_mul(&lookup(&qs)?)?.f_reshape([n, -1])
            }
        }
        other => Err(TchError::Convert(format!("ggml type {other} cannot be dequantized (diffusers loads {})", GgmlType::supported_names().join(", ")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random blocks of `t` whose fp16 scales are finite (NaN scales compare unequal).
    fn blocks(t: GgmlType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        };
        let ts = t.type_size() as usize;
        let mut v: Vec<u8> = (0..n * ts).map(|_| next()).collect();
        // Every fp16 in a block whose exponent bits are all ones (inf/NaN) gets a small exponent.
        for b in v.chunks_exact_mut(ts) {
            let offs: &[usize] = match t {
                GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
                GgmlType::Q6_K | GgmlType::Q3_K => &[ts - 2],
                GgmlType::Q2_K => &[ts - 4, ts - 2],
                _ => &[],
            };
            for &o in offs {
                b[o + 1] &= 0x3B; // exponent < 0x1F, sign +: finite
            }
            if t == GgmlType::BF16 {
                b[1] &= 0x3F;
            }
        }
        v
    }

    #[test]
    fn torch_ops_equal_the_host_decoder_bit_for_bit() {
        let types = [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
            GgmlType::BF16,
        ];
        for (i, t) in types.into_iter().enumerate() {
            let bs = t.block_size() as i64;
            let (rows, blocks_per_row) = (3i64, 2i64);
            let bytes = blocks(t, (rows * blocks_per_row) as usize, 0x9E37_79B9_7F4A_7C15 ^ i as u64);
            let raw = Tensor::from_slice(&bytes).reshape([rows, -1]);
            let q = Quant { ggml_type: t, shape: vec![rows, blocks_per_row * bs] };
            let host = on_host(&raw, &q).unwrap();
            let ops = with_torch_ops(&raw, t).unwrap().reshape([rows, blocks_per_row * bs]);
            let want_kind = if ggml::diffusers_dtype_is_f16(t) { Kind::Half } else { Kind::Float };
            assert_eq!(ops.kind(), want_kind, "{t}: diffusers' result dtype");
            let ops = ops.to_kind(Kind::Float);
            assert!(ops.view_dtype(Kind::Int).equal(&host.view_dtype(Kind::Int)), "{t}: torch ops and the host decoder differ");
            // The layer: diffusers' `F.linear(x, dequantize(w).to(kind), bias.to(kind))`.
            let x = Tensor::randn([2, blocks_per_row * bs], (Kind::Float, Device::Cpu));
            let bias = Tensor::randn([rows], (Kind::Float, Device::Cpu));
            for kind in [Kind::Float, Kind::BFloat16] {
                let want = x.to_kind(kind).linear(&host.to_kind(kind), Some(&bias.to_kind(kind)));
                assert!(linear(&x.to_kind(kind), &raw, &q, Some(&bias), kind).unwrap().equal(&want), "{t} {kind:?}");
            }
            // Through the public entry, at a compute dtype.
            let bf = dequantize(&raw, &q, Kind::BFloat16).unwrap();
            assert!(bf.equal(&host.to_kind(Kind::BFloat16)), "{t}");
        }
    }
}
