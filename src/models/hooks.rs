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

use super::cast::{self, Cast};
use super::lora::{ConvArgs, Live};
use super::weights::param;
use tch::nn;
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

/// A linear layer announcing its path; its parameters come from the checkpoint ([`param`]).
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    pub path: String,
    /// Layerwise casting: parameters stored narrower, cast as the layer runs.
    cast: Option<Cast>,
    /// Live LoRA adapters beside it.
    lora: Option<Live>,
}

impl Linear {
    pub fn new(p: nn::Path, d_in: i64, d_out: i64, c: nn::LinearConfig) -> Linear {
        let bound = 1.0 / (d_in as f64).sqrt();
        let ws = param(&p, "weight", &[d_out, d_in], c.ws_init);
        let bs = c.bias.then(|| param(&p, "bias", &[d_out], c.bs_init.unwrap_or(nn::Init::Uniform { lo: -bound, up: bound })));
        let path = path_of(&p);
        let lora = Live::take(&p, &format!("{path}.weight"), ws.kind(), None);
        let cast = cast::layer(&path, &[Some(&ws), bs.as_ref()].into_iter().flatten().collect::<Vec<_>>());
        Linear { path, ws, bs, cast, lora }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // tch's `nn::Linear::forward`.
        scoped(&self.path, || {
            let y = x.linear(&cast::compute(&self.ws, self.cast), self.bs.as_ref().map(|b| cast::compute(b, self.cast)).as_ref());
            match &self.lora {
                Some(l) => l.apply(x, y).expect("a LoRA branch of the layer's shapes"),
                None => y,
            }
        })
    }
    pub fn weight(&self) -> &Tensor {
        &self.ws
    }
}

/// A 2-D convolution (zero padding) announcing its path; parameters from the checkpoint.
#[derive(Debug)]
pub struct Conv2d {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    pub path: String,
    cast: Option<Cast>,
    stride: i64,
    padding: i64,
    dilation: i64,
    groups: i64,
    lora: Option<Live>,
}

impl Conv2d {
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, c: nn::ConvConfig) -> Conv2d {
        let ws = param(&p, "weight", &[cout, cin / c.groups, k, k], c.ws_init);
        let bs = c.bias.then(|| param(&p, "bias", &[cout], c.bs_init));
        let path = path_of(&p);
        let lora = Live::take(&p, &format!("{path}.weight"), ws.kind(), Some(ConvArgs { stride: c.stride, padding: c.padding, dilation: c.dilation }));
        let cast = cast::layer(&path, &[Some(&ws), bs.as_ref()].into_iter().flatten().collect::<Vec<_>>());
        Conv2d { path, ws, bs, cast, stride: c.stride, padding: c.padding, dilation: c.dilation, groups: c.groups, lora }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // tch's `nn::Conv2D::forward` with `PaddingMode::Zeros`.
        scoped(&self.path, || {
            let y = x.conv2d(&cast::compute(&self.ws, self.cast), self.bs.as_ref().map(|b| cast::compute(b, self.cast)).as_ref(), [self.stride; 2], [self.padding; 2], [self.dilation; 2], self.groups);
            match &self.lora {
                Some(l) => l.apply(x, y).expect("a LoRA branch of the layer's shapes"),
                None => y,
            }
        })
    }
    pub fn weight(&self) -> &Tensor {
        &self.ws
    }
}

/// Group normalisation announcing its path; affine parameters from the checkpoint.
#[derive(Debug)]
pub struct GroupNorm {
    pub ws: Option<Tensor>,
    pub bs: Option<Tensor>,
    pub path: String,
    groups: i64,
    eps: f64,
    cudnn: bool,
}

impl GroupNorm {
    pub fn new(p: nn::Path, groups: i64, channels: i64, c: nn::GroupNormConfig) -> GroupNorm {
        let (ws, bs) = if c.affine { (Some(param(&p, "weight", &[channels], c.ws_init)), Some(param(&p, "bias", &[channels], c.bs_init))) } else { (None, None) };
        GroupNorm { path: path_of(&p), ws, bs, groups, eps: c.eps, cudnn: c.cudnn_enabled }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // tch's `nn::GroupNorm::forward`.
        scoped(&self.path, || Tensor::group_norm(x, self.groups, self.ws.as_ref(), self.bs.as_ref(), self.eps, self.cudnn))
    }
    /// The affine weight, when there is one.
    pub fn weight(&self) -> Option<&Tensor> {
        self.ws.as_ref()
    }
}

/// Layer normalisation announcing its path; affine parameters from the checkpoint.
#[derive(Debug)]
pub struct LayerNorm {
    pub ws: Option<Tensor>,
    pub bs: Option<Tensor>,
    pub path: String,
    shape: Vec<i64>,
    eps: f64,
    cudnn: bool,
}

impl LayerNorm {
    pub fn new(p: nn::Path, shape: Vec<i64>, c: nn::LayerNormConfig) -> LayerNorm {
        let (ws, bs) = if c.elementwise_affine { (Some(param(&p, "weight", &shape, c.ws_init)), Some(param(&p, "bias", &shape, c.bs_init))) } else { (None, None) };
        LayerNorm { path: path_of(&p), ws, bs, shape, eps: c.eps, cudnn: c.cudnn_enabled }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // tch's `nn::LayerNorm::forward`.
        scoped(&self.path, || Tensor::layer_norm(x, self.shape.as_slice(), self.ws.as_ref(), self.bs.as_ref(), self.eps, self.cudnn))
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
