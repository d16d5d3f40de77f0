//! Live LoRA adapters (`fuse = false`), as PEFT's `LoraLayer` runs them beside a base layer:
//! `result = base(x) + lora_B(lora_A(x)) * scaling` for each adapter in name order, the scaling
//! `alpha / rank × scale`, the scale this run's (`run.adapter_scales`, else the adapter's
//! `scale`). The pairs are variables of the model under the layer's path
//! (`<module>.lora_A.<adapter>.weight`, `lora_B`), at the model's dtype, so offload streams, splits
//! and the residency ledger move and count them with their layer.

use std::cell::RefCell;
use std::collections::BTreeMap;

use tch::nn;
use tch::{Kind, TchError, Tensor};

/// One pair waiting for its layer while a model is built: A and B as the file holds them (f32).
pub struct Pending {
    pub adapter: String,
    pub a: Tensor,
    pub b: Tensor,
    /// `alpha / rank` (the run's scale multiplies it).
    pub scaling: f64,
}

thread_local! {
    /// The live pairs of the model being built, by the weight they sit beside.
    static PENDING: RefCell<BTreeMap<String, Vec<Pending>>> = const { RefCell::new(BTreeMap::new()) };
    /// This run's scale per adapter.
    static SCALES: RefCell<BTreeMap<String, f64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Runs `f` (a model's construction) with `pairs` given to the layers whose weights they name;
/// the names of pairs no layer took come back with `f`'s result (a layer type that cannot run
/// them live: an error for the caller to report).
pub fn building<R>(pairs: BTreeMap<String, Vec<Pending>>, f: impl FnOnce() -> R) -> (R, Vec<String>) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PENDING.with(|p| p.borrow_mut().clear());
        }
    }
    let any = !pairs.is_empty();
    PENDING.with(|p| *p.borrow_mut() = pairs);
    let _reset = Reset;
    let r = f();
    let left = if any { PENDING.with(|p| p.borrow().keys().cloned().collect()) } else { vec![] };
    (r, left)
}

/// Sets this thread's per-adapter scales (a run's effective values).
pub fn set_scales(scales: BTreeMap<String, f64>) {
    SCALES.with(|s| *s.borrow_mut() = scales);
}

fn scale_of(adapter: &str) -> f64 {
    SCALES.with(|s| s.borrow().get(adapter).copied().unwrap_or(1.0))
}

/// The pairs of `items` read from their files (at the file's dtype, on the CPU; each use converts them to
/// the model's, as PEFT holds them), each checked finite: (A, B) per item.
pub fn read_pairs(items: &[crate::checkpoint::lora::FuseItem]) -> Result<Vec<(Tensor, Tensor)>, String> {
    use crate::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
    use crate::checkpoint::load::{load, LoadOptions};
    let mut files: BTreeMap<&std::path::Path, Vec<&str>> = BTreeMap::new();
    for i in items {
        files.entry(i.file.as_path()).or_default().extend([i.down.as_str(), i.up.as_str()]);
    }
    let mut stores = BTreeMap::new();
    for (path, names) in files {
        let ck = Checkpoint::open(resolve_source(path, None, None, VariantPolicy::Require).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let store = load(&ck, Some(&names), LoadOptions { float_kind: None, device: tch::Device::Cpu, populate: false }).map_err(|e| e.to_string())?;
        stores.insert(path, store.into_owned());
    }
    items
        .iter()
        .map(|i| {
            let s = &stores[i.file.as_path()];
            for t in [&i.down, &i.up] {
                if !bool::try_from(s[t].isfinite().all()).unwrap_or(false) {
                    return Err(format!("adapter `{}`: `{}`: tensor `{t}` holds NaN or infinite values", i.adapter, i.file.display()));
                }
            }
            // kohya FLUX's conversion, as diffusers does it on the file's tensors: alpha / rank
            // multiplied in at their dtype, then B split by rows, the final modulation's halves swapped.
            // New tensors, never in place: a split pair's A is shared by its targets.
            let scaled = |t: &Tensor, f: f64| if f != 1.0 { t * f } else { t.shallow_clone() };
            let a = scaled(&s[&i.down], i.down_mul);
            let mut b = scaled(&s[&i.up], i.up_mul);
            if let Some((start, n)) = i.up_rows {
                b = b.narrow(0, start as i64, n as i64);
            }
            if i.swap_up_halves {
                let half = b.size()[0] / 2;
                b = Tensor::cat(&[b.narrow(0, half, half), b.narrow(0, 0, half)], 0);
            }
            Ok((a, b))
        })
        .collect()
}

/// The live pairs of `items` (one component's), read, by the weight they sit beside.
pub fn pending(items: &[crate::checkpoint::lora::FuseItem]) -> Result<BTreeMap<String, Vec<Pending>>, String> {
    let mut out: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
    for (i, (a, b)) in items.iter().zip(read_pairs(items)?) {
        out.entry(i.weight.clone()).or_default().push(Pending { adapter: i.adapter.clone(), a, b, scaling: i.scaling });
    }
    Ok(out)
}

/// How a Conv2d's `lora_A` runs (its base layer's stride, padding, dilation).
#[derive(Debug, Clone, Copy)]
pub struct ConvArgs {
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
}

/// The live pairs beside one layer.
#[derive(Debug)]
pub struct Live {
    pairs: Vec<(String, Tensor, Tensor, f64)>,
    conv: Option<ConvArgs>,
}

impl Live {
    /// The pairs for the weight `weight` of the layer at `p` (None without any), registered as
    /// variables at `kind` on the layer's device. During the dry pass nothing is taken.
    pub fn take(p: &nn::Path, weight: &str, kind: Kind, conv: Option<ConvArgs>) -> Option<Live> {
        if crate::models::weights::is_dry_pass() {
            return None;
        }
        let pending = PENDING.with(|m| m.borrow_mut().remove(weight))?;
        let device = p.device();
        let pairs = pending
            .into_iter()
            .map(|q| {
                let a = p.sub("lora_A").sub(&q.adapter).add("weight", q.a.to_kind(kind).to_device(device), false);
                let b = p.sub("lora_B").sub(&q.adapter).add("weight", q.b.to_kind(kind).to_device(device), false);
                (q.adapter, a, b, q.scaling)
            })
            .collect();
        Some(Live { pairs, conv })
    }

    /// `base` (the layer's output on `x`) plus each adapter's branch `B(A(x)) × scaling`. A
    /// Linear's branch is accumulated into `base` by one GEMM with the scaling applied to the
    /// rank-wide `A(x)` (PEFT scales B's full-width output, then adds: two more passes over the
    /// activations; the sums agree to float rounding). A Conv2d's runs in PEFT's order.
    pub fn apply(&self, x: &Tensor, base: Tensor) -> Result<Tensor, TchError> {
        let kind = base.kind();
        let mut result = base;
        for (adapter, a, b, scaling) in &self.pairs {
            let x = if x.kind() != a.kind() { x.f_to_kind(a.kind())? } else { x.shallow_clone() };
            let s = scaling * scale_of(adapter);
            match self.conv {
                None if result.kind() == b.kind() && result.is_contiguous() => {
                    let h = x.f_linear::<&Tensor>(a, None)?.f_mul_scalar(s)?;
                    let out = *result.size().last().expect("a Linear's output has a last dimension");
                    let r = h.size().last().copied().unwrap_or(0);
                    let _ = result.f_view([-1, out])?.f_addmm_(&h.f_reshape([-1, r])?, &b.f_transpose(0, 1)?)?;
                }
                None => {
                    let h = x.f_linear::<&Tensor>(a, None)?.f_linear::<&Tensor>(b, None)?;
                    result = result.f_add(&h.f_mul_scalar(s)?)?;
                }
                Some(c) => {
                    let h = x.f_conv2d(a, None::<&Tensor>, [c.stride; 2], [c.padding; 2], [c.dilation; 2], 1)?.f_conv2d(b, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)?;
                    result = result.f_add(&h.f_mul_scalar(s)?)?;
                }
            }
        }
        if result.kind() != kind {
            result = result.f_to_kind(kind)?;
        }
        Ok(result)
    }
}
