//! diffusers `resnet.py`: `ResnetBlock2D`, `Downsample2D`, `Upsample2D`.

use tch::nn;
use tch::Tensor;

use super::hooks::{scoped, Conv2d, GroupNorm, Linear};

/// `t` on `like`'s device: a no-op unless a component is split across devices, where each
/// no-split unit moves its inputs to its own weights (accelerate's `AlignDevicesHook`).
pub fn on(t: &Tensor, like: &Tensor) -> Tensor {
    let d = like.device();
    if t.device() == d {
        t.shallow_clone()
    } else {
        t.to_device(d)
    }
}

pub fn conv2d(vs: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Conv2d {
    Conv2d::new(vs, cin, cout, k, nn::ConvConfig { stride, padding, ..Default::default() })
}

pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> GroupNorm {
    GroupNorm::new(vs, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm = "default"` and `output_scale_factor`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    path: String,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, cin: i64, cout: i64, temb_channels: Option<i64>, groups: i64, eps: f64, output_scale_factor: f64) -> Self {
        ResnetBlock2D {
            path: super::hooks::path_of(&vs),
            norm1: group_norm(&vs / "norm1", groups, cin, eps),
            conv1: conv2d(&vs / "conv1", cin, cout, 3, 1, 1),
            time_emb_proj: temb_channels.map(|t| Linear::new(&vs / "time_emb_proj", t, cout, Default::default())),
            norm2: group_norm(&vs / "norm2", groups, cout, eps),
            conv2: conv2d(&vs / "conv2", cout, cout, 3, 1, 1),
            // A 1x1 projection when the channel count changes (diffusers `use_in_shortcut`).
            conv_shortcut: (cin != cout).then(|| conv2d(&vs / "conv_shortcut", cin, cout, 1, 1, 0)),
            output_scale_factor,
        }
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        scoped(&self.path, || self.forward_inner(x, temb))
    }

    fn forward_inner(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let x = &on(x, self.conv1.weight());
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&on(temb, proj.weight()).silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with a convolution (stride 2).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: i64,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        Downsample2D { conv: conv2d(&vs / "conv", channels, channels, 3, 2, padding), padding }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = &on(x, self.conv.weight());
        if self.padding == 0 {
            // diffusers pads (0, 1, 0, 1) itself when the conv has no padding.
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers `Upsample2D`: nearest x2 (or to `size`), then a 3x3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Upsample2D { conv: conv2d(&vs / "conv", channels, channels, 3, 1, 1) }
    }
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let x = &on(x, self.conv.weight());
        let (h, w) = match size {
            Some(s) => s,
            None => {
                let s = x.size();
                (s[2] * 2, s[3] * 2)
            }
        };
        self.conv.forward(&x.upsample_nearest2d([h, w], None, None))
    }
}
