//! Building a model from its checkpoint, strictly: every parameter the model asks for present with
//! its shape and nothing unexpected (diffusers' `load_state_dict` behaviour), else an error listing
//! them. Models are built with `tch::nn` paths whose segments equal the checkpoint's key segments
//! (candle's and diffusers-rs' layout), so a missing weight names the exact key; the parameters are
//! the checkpoint's tensors themselves ([`param`], [`build_from_checkpoint`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::mpsc::Receiver;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::load::{check_keys, KeyMismatch, Mapped, Maps, Source as MapSource};
use crate::checkpoint::CheckpointError;
use crate::models::quantized::Quant;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Keys(#[from] KeyMismatch),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{model}: {msg}")]
    Other { model: String, msg: String },
}

/// Buffers that some checkpoints carry and others do not (transformers 4 saved CLIP's
/// `position_ids`; transformers 5 does not): tolerated as unexpected keys, never required.
pub fn optional_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// Told the bytes of each parameter as it is placed.
pub type ProgressSink = Rc<dyn Fn(u64)>;

/// What [`param`] hands out while [`build_from_checkpoint`] runs.
enum Source {
    /// The first pass: placeholders that own no memory, recording what the model asks for
    /// (name -> shape) and in which order.
    Dry { requested: BTreeMap<String, Vec<u64>>, order: Vec<Wanted> },
    /// The second pass: the checkpoint's tensors, prepared ahead by a worker in the order the
    /// dry pass recorded and moved to `device` as the model takes them.
    Stream { rx: Receiver<Prepared>, device: Device, early: BTreeMap<String, Prepared>, error: Option<WeightsError>, zero_copy: bool },
}

/// A tensor the model asks for: its name, a dtype it keeps whatever the model's, and whether it
/// stays in its GGUF blocks (a quantized Linear's weight).
type Wanted = (String, Option<Kind>, bool);

/// A tensor the worker prepared: a view of the mapping (with where it lies) or a converted buffer.
struct Prepared {
    name: String,
    tensor: Result<(Tensor, Option<MapSource>), CheckpointError>,
}

thread_local! {
    static SOURCE: RefCell<Option<Source>> = const { RefCell::new(None) };
    static INITIALISED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static PROGRESS: RefCell<Option<ProgressSink>> = const { RefCell::new(None) };
    /// The GGUF-quantized tensors of the checkpoint being built from (both passes).
    static QUANTS: RefCell<BTreeMap<String, Quant>> = const { RefCell::new(BTreeMap::new()) };
    /// LoRA pairs merged into the weights of the model being built (diffusers' `fuse_lora`).
    static FUSE: RefCell<BTreeMap<String, Vec<Delta>>> = const { RefCell::new(BTreeMap::new()) };
    /// The dtype the model being built computes in.
    static COMPUTE: std::cell::Cell<Kind> = const { std::cell::Cell::new(Kind::Float) };
}

/// How many parameters this thread has created with an initialiser (built without a
/// checkpoint); loading a model from its checkpoint adds none.
pub fn initialised_params() -> usize {
    INITIALISED.with(|c| c.get())
}

/// Runs `f` with `sink` told the bytes of every parameter placed by the models it builds on this
/// thread (a progress bar per component).
pub fn with_progress<R>(sink: ProgressSink, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PROGRESS.with(|p| p.borrow_mut().take());
        }
    }
    PROGRESS.with(|p| *p.borrow_mut() = Some(sink));
    let _reset = Reset;
    f()
}

/// Clears the source even when model construction panics.
struct SourceGuard;

impl Drop for SourceGuard {
    fn drop(&mut self) {
        SOURCE.with(|s| s.borrow_mut().take());
        QUANTS.with(|q| q.borrow_mut().clear());
    }
}

/// A tensor of `shape` that owns no memory (a zero-dim zero expanded): the dry pass's placeholder.
fn placeholder(shape: &[i64]) -> Tensor {
    Tensor::zeros([], (Kind::Float, Device::Cpu)).expand(shape, true)
}

/// A model parameter `name` under `p` of `shape`. While [`build_from_checkpoint`] runs, it is
/// the checkpoint's tensor itself (a view of the mapped file when the dtype matches, else
/// converted once), on the model's device: nothing is initialised or staged. Otherwise (a model
/// built without a checkpoint, e.g. in tests) a variable initialised with `init`.
pub fn param(p: &nn::Path, name: &str, shape: &[i64], init: nn::Init) -> Tensor {
    param_with(p, name, shape, init, None, false)
}

/// A Linear weight `name` under `p` of `shape` that may stay quantized: from a GGUF checkpoint
/// whose tensor is quantized, its blocks (`U8` of its byte shape) and how to dequantize them to
/// the compute dtype (diffusers' `GGUFLinear`); else as [`param`].
pub fn param_quantizable(p: &nn::Path, name: &str, shape: &[i64], init: nn::Init) -> (Tensor, Option<(Quant, Kind)>) {
    let full = full_name(p, name);
    let quant = QUANTS.with(|q| q.borrow().get(&full).cloned());
    let t = param_with(p, name, shape, init, None, quant.is_some());
    (t, quant.map(|q| (q, COMPUTE.with(|c| c.get()))))
}

/// [`param`] kept at `kind` whatever the model's dtype (transformers' `_keep_in_fp32_modules`:
/// T5's `wo` stays fp32 in an fp16 model).
pub fn param_at(p: &nn::Path, name: &str, shape: &[i64], kind: Kind) -> Tensor {
    let t = param_with(p, name, shape, nn::Init::Const(0.), Some(kind), false);
    if t.kind() == kind || SOURCE.with(|s| s.borrow().is_some()) {
        t
    } else {
        // Built without a checkpoint (tests): the variable itself at `kind`.
        t.to_kind(kind)
    }
}

/// One LoRA pair to merge into a weight: `W += scaling × B @ A` (f32 tensors as the file holds them).
pub struct Delta {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
}

/// Runs `f` (a model's construction) with `fuse` merged into the named weights as they load,
/// in each list's order (PEFT's `merge`, adapter by adapter).
pub fn with_fused<R>(fuse: BTreeMap<String, Vec<Delta>>, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FUSE.with(|x| x.borrow_mut().clear());
        }
    }
    FUSE.with(|x| *x.borrow_mut() = fuse);
    let _reset = Reset;
    f()
}

/// `w` with `deltas` merged, as PEFT merges on the CPU: A and B at the model's dtype (`w`'s), in
/// float32 for the product when that is 16-bit, `(B @ A) * scaling` (a Conv2d's by its 1x1
/// squeeze or `conv2d(A^T, B)^T`), back to the model's dtype, added to the weight.
fn merged(w: &Tensor, deltas: &[Delta]) -> Result<Tensor, tch::TchError> {
    let kind = w.kind();
    // `empty_like` + `copy_`: one pass (tch's `copy` zero-fills first).
    let mut out = w.f_empty_like()?;
    out.f_copy_(w)?;
    for d in deltas {
        let at = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            let t = t.f_to_kind(kind)?;
            if matches!(kind, Kind::Half | Kind::BFloat16) {
                t.f_to_kind(Kind::Float)
            } else {
                Ok(t)
            }
        };
        let (a, b) = (at(&d.a)?, at(&d.b)?);
        if let [rows, cols] = w.size().as_slice() {
            // By blocks of rows, so that the float32 product of a large layer (SDXL's 10240 x 1280
            // feed-forward: 52 MB) is never held whole: each row of the delta is its own product.
            let step = ((4i64 << 20) / (4 * cols.max(&1))).max(1);
            let mut start = 0;
            while start < *rows {
                let n = step.min(rows - start);
                let mut delta = b.f_narrow(0, start, n)?.f_matmul(&a)?;
                let _ = delta.f_mul_scalar_(d.scaling)?;
                let _ = out.f_narrow(0, start, n)?.f_add_(&delta.f_to_kind(kind)?)?;
                start += n;
            }
            continue;
        }
        let mut delta = match w.size().as_slice() {
            [_, _, 1, 1] => b.f_squeeze_dim(3)?.f_squeeze_dim(2)?.f_matmul(&a.f_squeeze_dim(3)?.f_squeeze_dim(2)?)?.f_unsqueeze(2)?.f_unsqueeze(3)?,
            [_, _, _, _] => a.f_transpose(0, 1)?.f_conv2d(&b, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)?.f_transpose(0, 1)?,
            s => return Err(tch::TchError::Shape(format!("a LoRA pair cannot change a weight of shape {s:?}"))),
        };
        let _ = delta.f_mul_scalar_(d.scaling)?;
        let _ = out.f_add_(&delta.f_to_kind(kind)?)?;
    }
    Ok(out)
}

/// Whether [`build_from_checkpoint`]'s first pass (placeholders) is running on this thread.
pub fn is_dry_pass() -> bool {
    SOURCE.with(|s| matches!(*s.borrow(), Some(Source::Dry { .. })))
}

fn full_name(p: &nn::Path, name: &str) -> String {
    let base = p.components().collect::<Vec<_>>().join(".");
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}.{name}")
    }
}

fn param_with(p: &nn::Path, name: &str, shape: &[i64], init: nn::Init, kind: Option<Kind>, quantized: bool) -> Tensor {
    let full = full_name(p, name);
    let taken = SOURCE.with(|s| s.borrow_mut().as_mut().map(|src| take(src, full, shape, kind, quantized)));
    match taken {
        Some(t) => p.add(name, t, false),
        None => {
            INITIALISED.with(|c| c.set(c.get() + 1));
            p.var(name, shape, init)
        }
    }
}

fn take(src: &mut Source, full: String, shape: &[i64], kind: Option<Kind>, quantized: bool) -> Tensor {
    let (rx, device, early, error, zero_copy) = match src {
        Source::Dry { requested, order } => {
            requested.insert(full.clone(), shape.iter().map(|&d| d as u64).collect());
            order.push((full, kind, quantized));
            return placeholder(shape);
        }
        Source::Stream { rx, device, early, error, zero_copy } => (rx, *device, early, error, zero_copy),
    };
    // The worker follows the dry pass's order; a model that asks in another order still gets
    // its tensor (earlier arrivals wait in `early`).
    let mut got = early.remove(&full);
    while got.is_none() {
        match rx.recv() {
            Ok(p) if p.name == full => got = Some(p),
            Ok(p) => {
                early.insert(p.name.clone(), p);
            }
            Err(_) => break,
        }
    }
    let fail = |error: &mut Option<WeightsError>, e: WeightsError| {
        error.get_or_insert(e);
        placeholder(shape)
    };
    let Some(Prepared { tensor, .. }) = got else {
        return fail(error, WeightsError::Other { model: String::new(), msg: format!("`{full}` was not prepared") });
    };
    let (t, view) = match tensor {
        Ok(x) => x,
        Err(e) => return fail(error, e.into()),
    };
    // A LoRA merged into this weight: a new tensor (a view's pages go back to the file).
    let fused = FUSE.with(|f| f.borrow().get(&full).map(|ds| merged(&t, ds)));
    let (t, view) = match fused {
        None => (t, view),
        Some(Ok(m)) => {
            drop(t);
            if let Some(v) = view {
                MAPS.with(|m| m.borrow().as_ref().map(|m| m.release(v)));
            }
            (m, None)
        }
        Some(Err(e)) => return fail(error, WeightsError::Other { model: String::new(), msg: format!("merging a LoRA into `{full}`: {e}") }),
    };
    let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let t = if device == Device::Cpu {
        *zero_copy |= view.is_some();
        t
    } else {
        match t.f_to_device(device) {
            Ok(moved) => {
                // The host copy (a converted buffer, or the mapped pages) goes now: the load holds
                // a few tensors on the host at a time, never the component.
                drop(t);
                if let Some(v) = view {
                    MAPS.with(|m| m.borrow().as_ref().map(|m| m.release(v)));
                }
                moved
            }
            Err(e) => return fail(error, WeightsError::Other { model: String::new(), msg: format!("cannot move `{full}` to {device:?}: {e}") }),
        }
    };
    PROGRESS.with(|p| p.borrow().as_ref().map(|f| f(bytes)));
    t
}

thread_local! {
    /// The maps of the checkpoint being streamed, for releasing device-bound views' pages.
    static MAPS: RefCell<Option<std::sync::Arc<Maps>>> = const { RefCell::new(None) };
}

/// Tensors prepared ahead of the model taking them: one being moved, this many waiting (and a
/// batch being prepared).
const WINDOW: usize = 2;

/// Source bytes per preparation batch: enough tensors for every core, few enough that a
/// GPU-bound load holds little on the host.
const BATCH_BYTES: u64 = 64 << 20;

/// `order` cut into consecutive batches of at most [`BATCH_BYTES`] (a larger tensor alone).
fn batches<'a>(ck: &Checkpoint, order: &'a [Wanted]) -> Vec<&'a [Wanted]> {
    let mut out = vec![];
    let (mut start, mut bytes) = (0, 0);
    for (i, (name, _, _)) in order.iter().enumerate() {
        let b = ck.tensors.get(name).map_or(0, |t| t.info.nbytes());
        if i > start && bytes + b > BATCH_BYTES {
            out.push(&order[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    if start < order.len() {
        out.push(&order[start..]);
    }
    out
}

/// Builds a model whose parameters are the checkpoint's tensors (see [`param`]): the
/// `low_cpu_mem_usage` / meta-device idea. A dry pass with placeholders learns the parameters
/// the model asks for, so missing, unexpected and mis-shaped keys are an error listing them all
/// before any byte is converted or any device memory allocated. Then a worker thread prepares
/// each tensor (a view of the mapped file when the dtype is `kind`, else converted once) while
/// the model takes the previous one to `vs`'s device, so reading overlaps copying; tensors
/// bound for a GPU leave nothing behind on the host. Same-dtype CPU tensors stay views of the
/// mapped files, which the returned [`Mapped`] keeps alive (hold it as long as `vs`).
pub fn build_from_checkpoint<M>(vs: &VarStore, ck: &Checkpoint, model: &str, kind: Kind, build: impl Fn(nn::Path) -> M) -> Result<(M, Mapped), WeightsError> {
    let _guard = SourceGuard;
    QUANTS.with(|q| {
        *q.borrow_mut() = ck.tensors.iter().filter_map(|(k, t)| t.quant.as_ref().map(|q| (k.clone(), Quant { ggml_type: q.ggml_type, shape: q.shape.iter().map(|&d| d as i64).collect() }))).collect()
    });
    COMPUTE.with(|c| c.set(kind));
    // 1. Dry pass: what the model asks for, checked against the checkpoint.
    SOURCE.with(|s| *s.borrow_mut() = Some(Source::Dry { requested: BTreeMap::new(), order: vec![] }));
    drop(build(VarStore::new(Device::Cpu).root()));
    let Some(Source::Dry { mut requested, order }) = SOURCE.with(|s| s.borrow_mut().take()) else { unreachable!("the dry source outlives the dry build") };
    // Optional buffers present in the checkpoint are not "unexpected".
    for (name, t) in &ck.tensors {
        if optional_buffer(name) && !requested.contains_key(name) {
            requested.insert(name.clone(), t.shape().to_vec());
        }
    }
    check_keys(model, ck, &requested)?;

    // 2. The real pass, streamed.
    let maps = std::sync::Arc::new(Maps::open(ck, false)?);
    let device = vs.device();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Prepared>(WINDOW);
    let built = std::thread::scope(|scope| {
        let worker_maps = maps.clone();
        scope.spawn(move || {
            use rayon::prelude::*;
            // Small tensors are prepared a batch at a time on every core (most of a UNet's
            // tensors are too small for one conversion to use more than one), in order.
            for batch in batches(ck, &order) {
                let prepared: Vec<Prepared> = batch
                    .par_iter()
                    .map(|(name, own, quantized)| {
                        let tensor = worker_maps.tensor_as(ck, name, Some(own.unwrap_or(kind)), *quantized);
                        // A GPU-bound view is read now, while the model copies the previous tensor.
                        if let (Ok((_, Some(v))), true) = (&tensor, device != Device::Cpu) {
                            worker_maps.prefetch(*v);
                        }
                        Prepared { name: name.clone(), tensor }
                    })
                    .collect();
                for p in prepared {
                    if tx.send(p).is_err() {
                        return; // the build ended early (a panic): nothing more is wanted
                    }
                }
            }
        });
        struct MapsReset;
        impl Drop for MapsReset {
            fn drop(&mut self) {
                MAPS.with(|m| m.borrow_mut().take());
            }
        }
        let _reset = MapsReset;
        MAPS.with(|m| *m.borrow_mut() = Some(maps.clone()));
        SOURCE.with(|s| *s.borrow_mut() = Some(Source::Stream { rx, device, early: BTreeMap::new(), error: None, zero_copy: false }));
        let m = build(vs.root());
        // Dropping the receiver lets the worker finish even if the model skipped a tensor.
        let src = SOURCE.with(|s| s.borrow_mut().take());
        (m, src)
    });
    let (m, src) = built;
    let Some(Source::Stream { error, zero_copy, .. }) = src else { unreachable!("the stream source outlives the build") };
    if let Some(e) = error {
        return Err(match e {
            WeightsError::Other { msg, .. } => WeightsError::Other { model: model.to_string(), msg },
            e => e,
        });
    }
    let maps = std::sync::Arc::into_inner(maps).expect("the worker and the build have ended");
    // Every parameter left the mapping (converted, or on the device): its pages can go.
    Ok((m, if zero_copy { maps.into_mapped() } else { Mapped::none() }))
}
