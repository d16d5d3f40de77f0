//! Forward hooks: model code announces the module paths it runs (`down_blocks.1`,
//! `down_blocks.1.resnets.0.conv1`, ...) around their forward, the way PyTorch calls
//! `register_forward_pre_hook` / `register_forward_hook` on every `nn.Module`. The executor
//! installs one [`ForwardHooks`] per running component to stream weights to the device right
//! before a module runs (sequential and group offload); without one, a scope costs a
//! thread-local read.
//!
//! Paths are the checkpoint's module paths, so the executor finds a module's variables by prefix.

use std::cell::RefCell;
use std::rc::Rc;

use tch::nn::{self, Module};
use tch::Tensor;

pub trait ForwardHooks {
    /// `path` is about to run.
    fn pre(&self, path: &str);
    /// `path` has run (its kernels are queued, maybe not finished).
    fn post(&self, path: &str);
}

thread_local! {
    static ACTIVE: RefCell<Option<Rc<dyn ForwardHooks>>> = const { RefCell::new(None) };
}

/// Makes `hooks` the ones every scope on this thread calls, until replaced or cleared.
pub fn set(hooks: Option<Rc<dyn ForwardHooks>>) {
    ACTIVE.with(|a| *a.borrow_mut() = hooks);
}

/// Runs `f` as the forward of module `path`.
pub fn scoped<R>(path: &str, f: impl FnOnce() -> R) -> R {
    // A clone of the Rc, so that the hooks are not borrowed while `f` runs nested scopes.
    let hooks = ACTIVE.with(|a| a.borrow().clone());
    match hooks {
        None => f(),
        Some(h) => {
            h.pre(path);
            let out = f();
            h.post(path);
            out
        }
    }
}

/// The dotted path of an `nn::Path` (`down_blocks.0.resnets.1`).
pub fn path_of(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// `nn::Linear` announcing its path.
#[derive(Debug)]
pub struct Linear {
    pub inner: nn::Linear,
    pub path: String,
}

impl Linear {
    pub fn new(p: nn::Path, d_in: i64, d_out: i64, c: nn::LinearConfig) -> Linear {
        Linear { path: path_of(&p), inner: nn::linear(p, d_in, d_out, c) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || self.inner.forward(x))
    }
    pub fn weight(&self) -> &Tensor {
        &self.inner.ws
    }
}

/// `nn::Conv2D` announcing its path.
#[derive(Debug)]
pub struct Conv2d {
    pub inner: nn::Conv2D,
    pub path: String,
}

impl Conv2d {
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, c: nn::ConvConfig) -> Conv2d {
        Conv2d { path: path_of(&p), inner: nn::conv2d(p, cin, cout, k, c) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || self.inner.forward(x))
    }
    pub fn weight(&self) -> &Tensor {
        &self.inner.ws
    }
}

/// `nn::GroupNorm` announcing its path.
#[derive(Debug)]
pub struct GroupNorm {
    pub inner: nn::GroupNorm,
    pub path: String,
}

impl GroupNorm {
    pub fn new(p: nn::Path, groups: i64, channels: i64, c: nn::GroupNormConfig) -> GroupNorm {
        GroupNorm { path: path_of(&p), inner: nn::group_norm(p, groups, channels, c) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || self.inner.forward(x))
    }
    /// The affine weight, when there is one.
    pub fn weight(&self) -> Option<&Tensor> {
        self.inner.ws.as_ref()
    }
}

/// `nn::LayerNorm` announcing its path.
#[derive(Debug)]
pub struct LayerNorm {
    pub inner: nn::LayerNorm,
    pub path: String,
}

impl LayerNorm {
    pub fn new(p: nn::Path, shape: Vec<i64>, c: nn::LayerNormConfig) -> LayerNorm {
        LayerNorm { path: path_of(&p), inner: nn::layer_norm(p, shape, c) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || self.inner.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Log(RefCell<Vec<String>>);
    impl ForwardHooks for Log {
        fn pre(&self, path: &str) {
            self.0.borrow_mut().push(format!("pre {path}"));
        }
        fn post(&self, path: &str) {
            self.0.borrow_mut().push(format!("post {path}"));
        }
    }

    #[test]
    fn scopes_nest_and_name_checkpoint_paths() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let lin = Linear::new(&vs.root() / "blocks" / 0 / "to_q", 2, 2, Default::default());
        assert_eq!(lin.path, "blocks.0.to_q");
        let log = Rc::new(Log(RefCell::new(vec![])));
        set(Some(log.clone()));
        let _ = scoped("blocks.0", || lin.forward(&Tensor::zeros([1, 2], (tch::Kind::Float, tch::Device::Cpu))));
        set(None);
        let _ = lin.forward(&Tensor::zeros([1, 2], (tch::Kind::Float, tch::Device::Cpu)));
        assert_eq!(*log.0.borrow(), ["pre blocks.0", "pre blocks.0.to_q", "post blocks.0.to_q", "post blocks.0"]);
    }
}
