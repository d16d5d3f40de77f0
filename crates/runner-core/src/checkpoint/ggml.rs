//! ggml's block types in plain Rust: dequantizing every type diffusers loads and quantizing to the
//! types `gguf.quants.quantize` writes, with gguf-py 0.19's arithmetic (numpy float32, its element
//! order within a block), so that runner's bytes equal the Python package's and its values equal
//! `gguf.quants.dequantize`'s. (diffusers' own dequantize keeps the fp16 scales in fp16 and
//! multiplies there: the executor does that with libtorch.)

use half::{bf16, f16};

use super::gguf::GgmlType;

const QK_K: usize = 256;
/// IQ4_NL's and IQ4_XS's non-linear 4-bit grid.
const KVALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `t`) to float32 with gguf-py's arithmetic (float32
/// throughout), appending to `out`. Errors for a type diffusers does not load, or bytes that are
/// not whole blocks.
pub fn dequantize(t: GgmlType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), String> {
    dequantize_with(t, bytes, out, |x| x)
}

/// The dtype diffusers' `dequantize_gguf_tensor` returns for a type: float32 for BF16 and the IQ4
/// lookups, float16 for the rest (its scales stay fp16 and so do its products).
pub fn diffusers_dtype_is_f16(t: GgmlType) -> bool {
    !matches!(t, GgmlType::BF16 | GgmlType::IQ4_NL | GgmlType::IQ4_XS)
}

/// Dequantizes as diffusers 0.42's `dequantize_gguf_tensor` does, value for value: each of its
/// fp16 operations is a float32 operation rounded to fp16 (what ATen does for half tensors, on
/// the CPU and in CUDA kernels alike), in its order (`(d * sc) * q - dmin * m`, ...). The values
/// are appended as f32 (exactly the fp16 ones where [`diffusers_dtype_is_f16`]); plain F32/F16
/// tensors as they are.
pub fn dequantize_as_diffusers(t: GgmlType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), String> {
    dequantize_with(t, bytes, out, round_f16)
}

/// [`dequantize_as_diffusers`] into `out`, which holds exactly the values (the executor's
/// per-forward path). Q8_0, Q4_0 and Q5_0 are one fp16 product in diffusers of operands whose
/// float32 product is exact, so they are decoded in float32 and rounded to fp16 a chunk at a time
/// (F16C where the CPU has it, through `half`): the same values, several times faster than a
/// rounding per element. Other types go through [`dequantize_as_diffusers`].
pub fn dequantize_as_diffusers_into(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (bs, ts) = (t.block_size() as usize, t.type_size() as usize);
    if bytes.len() % ts != 0 || bytes.len() / ts * bs != out.len() {
        return Err(format!("{} bytes of {t} blocks do not make {} values", bytes.len(), out.len()));
    }
    match t {
        GgmlType::Q8_0 => {
            for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                let d = h(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = d * q as i8 as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                let d = h(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let x = b[2 + j];
                    lo[j] = d * ((x & 0xF) as i32 - 8) as f32;
                    hi[j] = d * ((x >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                let d = h(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let x = b[6 + j];
                    lo[j] = d * (((x & 0xF) as u32 | ((qh >> j) & 1) << 4) as i32 - 16) as f32;
                    hi[j] = d * (((x >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16) as f32;
                }
            }
        }
        _ => {
            let mut v = Vec::with_capacity(out.len());
            dequantize_as_diffusers(t, bytes, &mut v)?;
            out.copy_from_slice(&v);
            return Ok(());
        }
    }
    round_f16_slice(out);
    Ok(())
}

/// Every value rounded to fp16 (ties to even, past 65504 infinity), as [`round_f16`] does one.
fn round_f16_slice(v: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let mut buf = [f16::ZERO; 1024];
    for c in v.chunks_mut(1024) {
        let b = &mut buf[..c.len()];
        b.convert_from_f32_slice(c);
        b.convert_to_f32_slice(c);
    }
}

/// The one block decoder both arithmetics share: gguf-py and diffusers do the same operations in
/// the same order, diffusers rounding each product and sum to fp16 (`r`), gguf-py keeping float32
/// (`r` the identity).
fn dequantize_with(t: GgmlType, bytes: &[u8], out: &mut Vec<f32>, r: impl Fn(f32) -> f32) -> Result<(), String> {
    let ts = t.type_size() as usize;
    if bytes.len() % ts != 0 {
        return Err(format!("{} bytes are not a whole number of {t} blocks of {ts} bytes", bytes.len()));
    }
    out.reserve(bytes.len() / ts * t.block_size() as usize);
    for b in bytes.chunks_exact(ts) {
        match t {
            // Plain tensors, and BF16 (exact in float32): nothing to round.
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(h(b, 0)),
            GgmlType::BF16 => out.push(bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            GgmlType::Q4_0 => {
                let d = h(b, 0);
                out.extend((0..32).map(|e| r(d * ((b[2 + e % 16] >> (4 * (e / 16)) & 0xF) as f32 - 8.0))));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (h(b, 0), h(b, 2));
                out.extend((0..32).map(|e| r(r(d * (b[4 + e % 16] >> (4 * (e / 16)) & 0xF) as f32) + m)));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let one = t == GgmlType::Q5_1;
                let d = h(b, 0);
                let m = if one { h(b, 2) } else { 0.0 };
                let at = if one { 4 } else { 2 };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                out.extend((0..32).map(|e| {
                    let q = (b[at + 4 + e % 16] >> (4 * (e / 16)) & 0xF) | (((qh >> e) & 1) as u8) << 4;
                    if one {
                        r(r(d * q as f32) + m)
                    } else {
                        r(d * (q as i8 - 16) as f32)
                    }
                }));
            }
            GgmlType::Q8_0 => {
                let d = h(b, 0);
                out.extend(b[2..34].iter().map(|&q| r(d * q as i8 as f32)));
            }
            GgmlType::Q2_K => {
                let (scales, qs, d, dmin) = (&b[0..16], &b[16..80], h(b, 80), h(b, 82));
                let dl: [f32; 16] = std::array::from_fn(|g| r(d * (scales[g] & 0xF) as f32));
                let ml: [f32; 16] = std::array::from_fn(|g| r(dmin * (scales[g] >> 4) as f32));
                out.extend((0..QK_K).map(|e| {
                    let (half, w) = (e / 128, e % 128);
                    let q = (qs[half * 32 + w % 32] >> (2 * (w / 32))) & 3;
                    r(r(dl[e / 16] * q as f32) - ml[e / 16])
                }));
            }
            GgmlType::Q3_K => {
                let (hmask, qs, sc, d) = (&b[0..32], &b[32..96], &b[96..108], h(b, 108));
                let dl: [f32; 16] = std::array::from_fn(|s| {
                    let l = (sc[s % 8] >> (4 * (s / 8))) & 0xF;
                    let hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
                    r(d * ((l | hi << 4) as i8 - 32) as f32)
                });
                out.extend((0..QK_K).map(|e| {
                    let (half, w) = (e / 128, e % 128);
                    let ql = (qs[half * 32 + w % 32] >> (2 * (w / 32))) & 3;
                    let qh = ((hmask[e % 32] >> (e / 32)) & 1) ^ 1;
                    r(dl[e / 16] * (ql as i8 - (qh << 2) as i8) as f32)
                }));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let (d, dmin) = (h(b, 0), h(b, 2));
                let (sc, m) = scale_min(&b[4..16]);
                let five = t == GgmlType::Q5_K;
                let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                let ds: [f32; 8] = std::array::from_fn(|g| r(d * sc[g] as f32));
                let dm: [f32; 8] = std::array::from_fn(|g| r(dmin * m[g] as f32));
                out.extend((0..QK_K).map(|e| {
                    let g = e / 32;
                    let mut q = (qs[(g / 2) * 32 + e % 32] >> (4 * (g % 2))) & 0xF;
                    if five {
                        q |= ((qh[e % 32] >> g) & 1) << 4;
                    }
                    r(r(ds[g] * q as f32) - dm[g])
                }));
            }
            GgmlType::Q6_K => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], h(b, 208));
                let ds: [f32; 16] = std::array::from_fn(|g| r(d * sc[g] as i8 as f32));
                out.extend((0..QK_K).map(|e| {
                    let (a, w) = (e / 128, e % 128);
                    let lo = (ql[a * 64 + w % 64] >> (4 * (w / 64))) & 0xF;
                    let hi = (qh[a * 32 + w % 32] >> (2 * (w / 32))) & 3;
                    r(ds[e / 16] * ((lo | hi << 4) as i8 - 32) as f32)
                }));
            }
            // The lookups are float32: fp16 `d` (times the fp16-rounded scale for XS) times them, in float32.
            GgmlType::IQ4_NL => {
                let d = h(b, 0);
                out.extend((0..32).map(|e| d * KVALUES[((b[2 + e % 16] >> (4 * (e / 16))) & 0xF) as usize] as f32));
            }
            GgmlType::IQ4_XS => {
                let d = h(b, 0);
                let sh = u16::from_le_bytes([b[2], b[3]]);
                let (sl, qs) = (&b[4..8], &b[8..136]);
                let dl: [f32; 8] = std::array::from_fn(|g| r(d * ((((sl[g / 2] >> (4 * (g % 2))) & 0xF) | (((sh >> (2 * g)) & 3) as u8) << 4) as i8 - 32) as f32));
                out.extend((0..QK_K).map(|e| {
                    let (g, w) = (e / 32, e % 32);
                    dl[g] * KVALUES[((qs[g * 16 + w % 16] >> (4 * (w / 16))) & 0xF) as usize] as f32
                }));
            }
            _ => return Err(format!("type {t} is not supported; supported: {}", GgmlType::supported_names().join(", "))),
        }
    }
    Ok(())
}

/// `x` rounded to the nearest fp16 value (ties to even), as a float32: `f16::from_f32(x).to_f32()`
/// without the conversions (this runs up to four times per dequantized element).
fn round_f16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 6.103_515_6e-5 {
        // fp16 subnormals: multiples of 2^-24. Adding 0.75 (whose float32 quantum is 2^-24)
        // rounds to one, ties to even; subtracting it back is exact.
        (a + 0.75) - 0.75
    } else {
        // Keep 10 mantissa bits, ties to even; past fp16's largest value (65504), infinity.
        let bits = a.to_bits();
        let r = f32::from_bits((bits + 0xFFF + ((bits >> 13) & 1)) & !0x1FFF);
        if r > 65504.0 {
            f32::INFINITY
        } else {
            r
        }
    };
    r.copysign(x)
}

/// Q4_K's and Q5_K's eight 6-bit (scale, min) pairs (`get_scale_min`).
fn scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        m[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        m[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, m)
}

/// The types [`quantize`] writes (those `gguf.quants.quantize` implements).
pub const QUANTIZE_TYPES: [GgmlType; 8] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

/// Quantizes `values` (whole blocks of `t`) to `t`, appending its bytes to `out`, with gguf-py's
/// arithmetic (float32 throughout, scales rounded to fp16 at the end).
pub fn quantize(t: GgmlType, values: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    let bs = t.block_size() as usize;
    if values.len() % bs != 0 {
        return Err(format!("{} values are not a whole number of {t} blocks of {bs}", values.len()));
    }
    out.reserve(values.len() / bs * t.type_size() as usize);
    let f16b = |x: f32| f16::from_f32(x).to_le_bytes();
    let inv = |d: f32| if d == 0.0 { 0.0 } else { 1.0 / d };
    for x in values.chunks_exact(bs) {
        match t {
            GgmlType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&f16b(x[0])),
            GgmlType::BF16 => out.extend_from_slice(&bf16_bits(x[0]).to_le_bytes()),
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let five = t == GgmlType::Q5_0;
                // The element of largest magnitude, the first one on a tie (argmax), with its sign.
                let max = x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let (levels, offset) = if five { (-16.0f32, 16.5f32) } else { (-8.0, 8.5) };
                let d = max / levels;
                let id = inv(d);
                let top = if five { 31 } else { 15 };
                let q: [u8; 32] = std::array::from_fn(|i| ((x[i] * id + offset) as u8).min(top));
                out.extend_from_slice(&f16b(d));
                if five {
                    out.extend_from_slice(&high_bits(&q).to_le_bytes());
                }
                out.extend((0..16).map(|i| (q[i] & 0xF) | (q[i + 16] << 4)));
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let five = t == GgmlType::Q5_1;
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let top = if five { 31u8 } else { 15 };
                let d = (max - min) / top as f32;
                let id = inv(d);
                let q: [u8; 32] = std::array::from_fn(|i| (((x[i] - min) * id + 0.5) as u8).min(top));
                out.extend_from_slice(&f16b(d));
                out.extend_from_slice(&f16b(min));
                if five {
                    out.extend_from_slice(&high_bits(&q).to_le_bytes());
                }
                out.extend((0..16).map(|i| (q[i] & 0xF) | (q[i + 16] << 4)));
            }
            GgmlType::Q8_0 => {
                let d = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let id = inv(d);
                out.extend_from_slice(&f16b(d));
                out.extend(x.iter().map(|&v| round_away(v * id) as u8));
            }
            _ => return Err(format!("cannot quantize to {t}; runner writes {}", QUANTIZE_TYPES.map(|t| t.name()).join(", "))),
        }
    }
    Ok(())
}

/// gguf-py's `np_roundf` (half away from zero) of a value within i8's range, then `astype(int8)`;
/// with integer conversions (`as` truncates toward zero), which x86-64's baseline has, where
/// `f32::round` is a libm call.
fn round_away(v: f32) -> i8 {
    let t = v as i32;
    let frac = v - t as f32; // exact: |v| < 2^23
    (if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }) as i8
}

/// Bit i: the fifth bit of q[i] (`np.packbits(q >> 4, bitorder="little")`).
fn high_bits(q: &[u8]) -> u32 {
    q.iter().enumerate().fold(0u32, |acc, (i, &v)| acc | (((v >> 4) & 1) as u32) << i)
}

/// ggml's `fp32_to_bf16`: NaN made quiet, otherwise rounded to nearest even.
fn bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    let n = if n & 0x7fff_ffff > 0x7f80_0000 { (n & 0xffff_0000) | (64 << 16) } else { n };
    ((n as u64 + 0x7fff + ((n >> 16) & 1) as u64) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_then_dequantize_is_close() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for t in QUANTIZE_TYPES {
            let mut q = vec![];
            quantize(t, &x, &mut q).unwrap();
            assert_eq!(q.len() as u64, 512 / t.block_size() * t.type_size(), "{t}");
            let mut y = vec![];
            dequantize(t, &q, &mut y).unwrap();
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // Half a step of each grid over the values' range (about 6): 4 bits, 5 bits, 8 bits.
            let bound = match t.name() {
                "F32" => 0.0,
                "F16" | "BF16" | "Q8_0" => 0.02,
                "Q5_0" | "Q5_1" => 0.2,
                _ => 0.4,
            };
            assert!(err <= bound, "{t}: {err}");
        }
        assert!(quantize(GgmlType::Q4_K, &x, &mut vec![]).unwrap_err().contains("cannot quantize to Q4_K"));
        assert!(quantize(GgmlType::Q8_0, &x[..33], &mut vec![]).unwrap_err().contains("whole number"));
        assert!(dequantize(GgmlType::Q8_0, &[0; 35], &mut vec![]).unwrap_err().contains("whole number"));
        assert!(dequantize(GgmlType::from_name("Q8_1").unwrap(), &[0; 40], &mut vec![]).unwrap_err().contains("not supported"));
        assert_eq!(bf16_bits(f32::NAN) & 0x7fc0, 0x7fc0);
        assert_eq!(bf16_bits(1.0), 0x3f80);
        for v in [0.5f32, -0.5, 1.5, -2.5, 0.49999997, -0.49999997, 126.5, -127.0, 0.0, -0.0, 3.2, -3.7] {
            assert_eq!(round_away(v), v.round() as i8, "{v}");
        }
        // round_f16 is half's conversion there and back: over all float32 exponents, a stride
        // through the mantissas, and the ties (low 13 bits 0x1000) around each stop.
        for x in (0..0x7f80_0000u32).step_by(0x0fff) {
            for b in [x, (x & !0x1fff) | 0x1000, (x & !0x1fff) | 0x3000] {
                for v in [f32::from_bits(b), -f32::from_bits(b)] {
                    assert_eq!(round_f16(v).to_bits(), f16::from_f32(v).to_f32().to_bits(), "{v:e}");
                }
            }
        }
        for v in [65504.0f32, 65519.99, 65520.0, 1e9, f32::INFINITY, 6.1035156e-5, 6.1e-5, 2.9802322e-8, 2.98e-8, 5.96e-8, 0.0] {
            assert_eq!(round_f16(v).to_bits(), f16::from_f32(v).to_f32().to_bits(), "{v:e}");
        }
        assert!(round_f16(f32::NAN).is_nan());
    }

    #[test]
    fn the_chunked_path_equals_the_per_value_one() {
        // Random blocks (any fp16 scale: subnormal, huge, infinite, NaN) of every type.
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::BF16] {
            let bytes: Vec<u8> = (0..t.type_size() * 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect();
            let mut want = vec![];
            dequantize_as_diffusers(t, &bytes, &mut want).unwrap();
            let mut got = vec![0f32; want.len()];
            dequantize_as_diffusers_into(t, &bytes, &mut got).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{t} value {i}: {a} vs {b}");
            }
            assert!(dequantize_as_diffusers_into(t, &bytes, &mut got[1..]).is_err());
        }
    }
}
