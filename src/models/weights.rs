//! Building a model from its checkpoint, strictly: every parameter the model asks for present with
//! its shape and nothing unexpected (diffusers' `load_state_dict` behaviour), else an error listing
//! them. Models are built with `tch::nn` paths whose segments equal the checkpoint's key segments
//! (candle's and diffusers-rs' layout), so a missing weight names the exact key; the parameters are
//! the checkpoint's tensors themselves ([`param`], [`build_from_checkpoint`]).

use std::cell::RefCell;
use std::collections::BTreeMap;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::load::{check_keys, load, KeyMismatch, LoadOptions, Mapped};
use crate::checkpoint::CheckpointError;

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

/// The checkpoint tensors a model under construction takes its parameters from, and the
/// parameters it asked for (name -> shape).
struct Source {
    tensors: BTreeMap<String, Tensor>,
    requested: BTreeMap<String, Vec<u64>>,
}

thread_local! {
    static SOURCE: RefCell<Option<Source>> = const { RefCell::new(None) };
    static INITIALISED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many parameters this thread has created with an initialiser (built without a
/// checkpoint); loading a model from its checkpoint adds none.
pub fn initialised_params() -> usize {
    INITIALISED.with(|c| c.get())
}

/// Clears the source even when model construction panics.
struct SourceGuard;

impl Drop for SourceGuard {
    fn drop(&mut self) {
        SOURCE.with(|s| s.borrow_mut().take());
    }
}

/// A model parameter `name` under `p` of `shape`. While [`build_from_checkpoint`] runs, it is
/// the checkpoint's tensor itself (a view of the mapped file when the dtype matches, else
/// converted once): nothing is allocated, initialised or copied. Otherwise (a model built
/// without a checkpoint, e.g. in tests) a variable initialised with `init`.
pub fn param(p: &nn::Path, name: &str, shape: &[i64], init: nn::Init) -> Tensor {
    let full = {
        let base = p.components().collect::<Vec<_>>().join(".");
        if base.is_empty() {
            name.to_string()
        } else {
            format!("{base}.{name}")
        }
    };
    let taken = SOURCE.with(|s| {
        s.borrow_mut().as_mut().map(|src| {
            src.requested.insert(full.clone(), shape.iter().map(|&d| d as u64).collect());
            match src.tensors.remove(&full) {
                Some(t) if t.size() == shape => t,
                // Missing or mis-shaped: reported with every other mismatch before anything runs.
                _ => Tensor::empty(shape, (Kind::Float, Device::Cpu)),
            }
        })
    });
    match taken {
        Some(t) => p.add(name, t, false),
        None => {
            INITIALISED.with(|c| c.set(c.get() + 1));
            p.var(name, shape, init)
        }
    }
}

/// Builds a model whose parameters are the checkpoint's tensors (see [`param`]): the
/// `low_cpu_mem_usage` / meta-device idea, without a meta device. Floats are cast to `kind`
/// once, at load; same-dtype tensors stay views of the mapped files, which the returned
/// [`Mapped`] keeps alive (hold it as long as `vs`). Missing, unexpected and mis-shaped keys are
/// an error listing them all, before any device memory is allocated; then the parameters move
/// to `vs`'s device.
pub fn build_from_checkpoint<M>(vs: &VarStore, ck: &Checkpoint, model: &str, kind: Kind, build: impl FnOnce(nn::Path) -> M) -> Result<(M, Mapped), WeightsError> {
    let store = load(ck, None, LoadOptions { float_kind: Some(kind), device: Device::Cpu, populate: false })?;
    let (tensors, mapped) = store.into_parts();
    let _guard = SourceGuard;
    SOURCE.with(|s| *s.borrow_mut() = Some(Source { tensors, requested: BTreeMap::new() }));
    let m = build(vs.root());
    let src = SOURCE.with(|s| s.borrow_mut().take()).expect("the source outlives the build");
    let mut expected = src.requested;
    // Optional buffers present in the checkpoint are not "unexpected".
    for (name, t) in &ck.tensors {
        if optional_buffer(name) && !expected.contains_key(name) {
            expected.insert(name.clone(), t.info.shape.clone());
        }
    }
    check_keys(model, ck, &expected)?;
    let device = vs.device();
    if device != Device::Cpu {
        tch::no_grad(|| {
            for (_, mut var) in vs.variables() {
                if var.device() != device {
                    let moved = var.f_to_device(device).map_err(|e| WeightsError::Other { model: model.to_string(), msg: e.to_string() })?;
                    var.set_data(&moved);
                }
            }
            Ok::<(), WeightsError>(())
        })?;
        // Every parameter now lives on the device: the mapping (and its pages) can go.
        drop(mapped);
        return Ok((m, Mapped::none()));
    }
    Ok((m, mapped))
}
