//! Filling a model's `VarStore` from a checkpoint, strictly: every expected key present with its
//! shape and nothing unexpected (diffusers' `load_state_dict` behaviour), else an error listing
//! them. Models are built with `tch::nn` paths whose segments equal the checkpoint's key segments
//! (candle's and diffusers-rs' layout), so a missing weight names the exact key.

use std::collections::BTreeMap;

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::load::{check_keys, load, KeyMismatch, LoadOptions};
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

/// Copies the checkpoint's tensors into `vs` (created on its device, variables at its kind),
/// casting floats to `kind`. Fails with the full list of missing/unexpected/mis-shaped keys.
pub fn load_varstore(vs: &mut VarStore, ck: &Checkpoint, model: &str, kind: Kind) -> Result<(), WeightsError> {
    let vars = vs.variables();
    let mut expected: BTreeMap<String, Vec<u64>> = vars.iter().map(|(k, t)| (k.clone(), t.size().iter().map(|&d| d as u64).collect())).collect();
    // Optional buffers present in the checkpoint are not "unexpected".
    let extra: Vec<String> = ck.tensors.keys().filter(|n| optional_buffer(n) && !expected.contains_key(*n)).cloned().collect();
    for name in extra {
        let shape = ck.tensors[&name].info.shape.clone();
        expected.insert(name, shape);
    }
    check_keys(model, ck, &expected)?;
    let names: Vec<&str> = vars.keys().map(String::as_str).collect();
    let store = load(ck, Some(&names), LoadOptions { float_kind: Some(kind), device: Device::Cpu, populate: false })?;
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let src = store.get(&name).expect("checked above");
            var.f_copy_(src).map_err(|e| WeightsError::Other { model: model.to_string(), msg: format!("copying `{name}`: {e}") })?;
        }
        Ok::<(), WeightsError>(())
    })?;
    Ok(())
}
