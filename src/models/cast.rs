//! Layerwise casting, as diffusers' `ModelMixin.enable_layerwise_casting(storage_dtype,
//! compute_dtype)` applies it (`hooks/layerwise_casting.py`): the weights (and biases) of every
//! supported leaf layer (`Linear`, `Conv2d`) whose module path no skip pattern matches are
//! converted once, at load, to the storage dtype, and each such layer casts them to the compute
//! dtype right before its forward and drops the cast copy after (diffusers' hook does
//! `module.to(compute)` in `pre_forward` and `module.to(storage)` in `post_forward`, which gives
//! back the same storage values).
//!
//! In runner the cast happens inside the layer's [`crate::models::hooks::scoped`] forward, so it
//! composes with offload streams without any coupling: a stream's `pre` brings the layer's
//! storage-dtype weights to the device first (streams move the narrow bytes), then the layer casts
//! them there; the variables always hold the storage tensors, so the ledger and the offload
//! host copies count storage bytes.
//!
//! The model's dtype (what inputs are cast to) stays the compute dtype: models read it from a
//! skipped layer's weight or from the inputs, never from a cast layer's weight.

use std::cell::RefCell;

use tch::{Kind, Tensor};

pub use crate::arch::cast::{cast_modules, is_cast, skipped, CASTABLE_CLASSES, DEFAULT_SKIP_MODULES_PATTERN};

/// A cast layer's dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cast {
    pub storage: Kind,
    pub compute: Kind,
}

thread_local! {
    /// The class being built and its cast, while [`building`] runs.
    static ACTIVE: RefCell<Option<(String, Cast)>> = const { RefCell::new(None) };
}

/// Runs `f` (a model's construction) with the layers it builds cast by `cast` when `Some`.
pub fn building<R>(class: &str, cast: Option<Cast>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<(String, Cast)>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            ACTIVE.with(|a| *a.borrow_mut() = prev);
        }
    }
    let Some(cast) = cast else { return f() };
    let prev = ACTIVE.with(|a| a.borrow_mut().replace((class.to_string(), cast)));
    let _reset = Reset(prev);
    f()
}

/// Called by a supported layer being built at `path` with its parameters: `Some` when the layer
/// is cast, its parameters then converted to the storage dtype (in place: the variables hold
/// them).
pub fn layer(path: &str, params: &[&Tensor]) -> Option<Cast> {
    let (class, cast) = ACTIVE.with(|a| a.borrow().clone())?;
    if skipped(&class, path) {
        return None;
    }
    if !crate::models::weights::is_dry_pass() {
        tch::no_grad(|| {
            for p in params {
                let mut v = p.shallow_clone();
                v.set_data(&p.to_kind(cast.storage));
            }
        });
    }
    Some(cast)
}

/// The tensor a cast layer computes with: `t` cast to the compute dtype (a temporary, dropped
/// after the forward), or `t` itself.
pub fn compute(t: &Tensor, cast: Option<Cast>) -> Tensor {
    match cast {
        Some(c) if t.kind() != c.compute => widen_fp8_on_cpu(t, c.compute).unwrap_or_else(|| t.to_kind(c.compute)),
        _ => t.shallow_clone(),
    }
}

/// libtorch widens fp8 on the CPU one element at a time (~6 ns each: 2 s per forward of a
/// 330M-parameter UNet). Every fp8 value is exact in f32, f16 and bf16, so a 256-entry table made
/// by libtorch's own conversion gives the same bits at a table lookup per element. None where it
/// does not apply (another device, dtype or layout), and the caller converts as usual.
fn widen_fp8_on_cpu(t: &Tensor, to: Kind) -> Option<Tensor> {
    if t.device() != tch::Device::Cpu || !matches!(t.kind(), Kind::Float8e4m3fn | Kind::Float8e5m2) || !t.is_contiguous() {
        return None;
    }
    let (_, _, table) = fp8_tables().iter().find(|(f, k, _)| *f == t.kind() && *k == to)?;
    let n = t.numel();
    let out = Tensor::empty(t.size(), (to, tch::Device::Cpu));
    // SAFETY: `t` is a contiguous CPU tensor of `n` one-byte elements; `out` a fresh contiguous CPU
    // tensor of `n` elements of `to`'s size (4 bytes for f32, 2 for f16/bf16), which is what is written.
    unsafe {
        let src = std::slice::from_raw_parts(t.data_ptr() as *const u8, n);
        if to == Kind::Float {
            lookup(src, table, std::slice::from_raw_parts_mut(out.data_ptr() as *mut u32, n), |b| b);
        } else {
            lookup(src, table, std::slice::from_raw_parts_mut(out.data_ptr() as *mut u16, n), |b| b as u16);
        }
    }
    Some(out)
}

/// The bits each fp8 byte widens to, per (fp8 kind, compute kind), made once by libtorch's own
/// conversion (not per layer call: this is the forward's hot path).
fn fp8_tables() -> &'static [(Kind, Kind, [u32; 256])] {
    static TABLES: std::sync::OnceLock<Vec<(Kind, Kind, [u32; 256])>> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let bytes = Tensor::arange(256, (Kind::Uint8, tch::Device::Cpu));
        let mut out = vec![];
        for from in [Kind::Float8e4m3fn, Kind::Float8e5m2] {
            for to in [Kind::Float, Kind::Half, Kind::BFloat16] {
                let wide = bytes.view_dtype(from).to_kind(to);
                let bits: Vec<u32> = if to == Kind::Float {
                    Vec::<i32>::try_from(&wide.view_dtype(Kind::Int)).expect("256 f32").into_iter().map(|b| b as u32).collect()
                } else {
                    Vec::<i16>::try_from(&wide.view_dtype(Kind::Int16)).expect("256 halves").into_iter().map(|b| b as u16 as u32).collect()
                };
                out.push((from, to, bits.try_into().expect("256 entries")));
            }
        }
        out
    })
}

fn lookup<T>(src: &[u8], table: &[u32; 256], dst: &mut [T], narrow: impl Fn(u32) -> T) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = narrow(table[s as usize]);
    }
}

/// Whether `device` can convert to `storage` and back (a clear error instead of a libtorch
/// abort mid-run).
pub fn probe(device: tch::Device, cast: Cast) -> Result<(), String> {
    let t = Tensor::f_zeros([2], (cast.compute, device)).map_err(|e| e.to_string())?;
    t.f_to_kind(cast.storage).and_then(|s| s.f_to_kind(cast.compute)).map(|_| ()).map_err(|e| format!("{device:?} cannot cast {:?} to {:?} and back: {e}", cast.compute, cast.storage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_what_diffusers_skips() {
        for (class, path, want) in [
            ("UNet2DConditionModel", "down_blocks.0.resnets.0.norm1", true),
            ("UNet2DConditionModel", "down_blocks.0.attentions.0.proj_in", false),
            ("UNet2DConditionModel", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", false),
            ("UNet2DConditionModel", "conv_norm_out", true),
            ("UNet2DConditionModel", "conv_in", false),
            ("SD3Transformer2DModel", "pos_embed.proj", true),
            ("SD3Transformer2DModel", "proj_out", true),
            ("SD3Transformer2DModel", "norm_out.linear", true),
            ("SD3Transformer2DModel", "transformer_blocks.0.norm1.linear", true),
            ("FluxTransformer2DModel", "single_transformer_blocks.0.proj_out", false),
            ("FluxTransformer2DModel", "x_embedder", false),
            ("AutoencoderKL", "decoder.mid_block.attentions.0.group_norm", true),
            ("AutoencoderKL", "post_quant_conv", false),
        ] {
            assert_eq!(skipped(class, path), want, "{class} {path}");
        }
    }

    #[test]
    fn layers_cast_only_while_building_a_cast_model() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cast = Cast { storage: Kind::Float8e4m3fn, compute: Kind::Float };
        let (a, n) = building("UNet2DConditionModel", Some(cast), || {
            (crate::models::hooks::Linear::new(&vs.root() / "time_embedding" / "linear_1", 2, 3, Default::default()), crate::models::hooks::Linear::new(&vs.root() / "norm", 2, 3, Default::default()))
        });
        let b = crate::models::hooks::Linear::new(&vs.root() / "other", 2, 3, Default::default());
        assert_eq!(vs.variables()["time_embedding.linear_1.weight"].kind(), Kind::Float8e4m3fn, "the variable holds the storage tensor");
        assert_eq!(a.weight().kind(), Kind::Float8e4m3fn);
        assert_eq!(n.weight().kind(), Kind::Float, "skipped");
        assert_eq!(b.weight().kind(), Kind::Float, "outside `building`");
        let x = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu));
        let y = a.forward(&x);
        assert_eq!(y.kind(), Kind::Float);
        let w = a.weight().to_kind(Kind::Float);
        assert!(y.allclose(&x.linear(&w, a.bs.as_ref().map(|b| b.to_kind(Kind::Float)).as_ref()), 1e-6, 1e-6, false));
    }

    #[test]
    fn the_fp8_table_gives_libtorchs_bits() {
        // Every byte of both fp8 formats (NaNs and subnormals included), to each compute dtype.
        let bytes = Tensor::arange(256, (Kind::Uint8, tch::Device::Cpu)).repeat([3]).view([3, 256]);
        for fp8 in [Kind::Float8e4m3fn, Kind::Float8e5m2] {
            let t = bytes.view_dtype(fp8);
            for to in [Kind::Float, Kind::Half, Kind::BFloat16] {
                let (ours, torch) = (super::widen_fp8_on_cpu(&t, to).unwrap(), t.to_kind(to));
                let bits = if to == Kind::Float { Kind::Int } else { Kind::Int16 };
                assert!(ours.view_dtype(bits).equal(&torch.view_dtype(bits)), "{fp8:?} -> {to:?}");
            }
        }
        // Not contiguous, or not fp8: libtorch's own conversion.
        assert!(super::widen_fp8_on_cpu(&bytes.view_dtype(Kind::Float8e4m3fn).tr(), Kind::Float).is_none());
        assert!(super::widen_fp8_on_cpu(&Tensor::ones([2], (Kind::Half, tch::Device::Cpu)), Kind::Float).is_none());
    }
}
