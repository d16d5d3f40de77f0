//! The float32 tensor arithmetic a schedule is computed with, behind a trait: the executor passes
//! libtorch's (`runner::schedulers::TorchMath`), so its schedules are diffusers' to the bit;
//! planning and validation pass [`StdMath`], the same operations in plain Rust, which can differ
//! from libtorch's vectorised kernels in the last bit of a value but never in what a schedule is
//! (its length, its classes, the errors a config gets).

/// The float32 operations diffusers' scheduler `__init__` / `set_timesteps` do on tensors.
pub trait F32Math {
    /// `torch.linspace(start, end, n, dtype=torch.float32)`.
    fn linspace(&self, start: f64, end: f64, n: usize) -> Vec<f32>;
    /// `torch.cumprod(x, dim=0)` of a float32 tensor.
    fn cumprod(&self, x: &[f32]) -> Vec<f32>;
    /// Elementwise `torch.sqrt` of a float32 tensor.
    fn sqrt(&self, x: &[f32]) -> Vec<f32>;
    /// Elementwise `torch.log` of a float32 tensor.
    fn log(&self, x: &[f32]) -> Vec<f32>;
    /// Elementwise `torch.exp` of a float32 tensor.
    fn exp(&self, x: &[f32]) -> Vec<f32>;

    /// `torch.sqrt` of a float32 scalar (a 0-d tensor).
    fn sqrt32(&self, x: f32) -> f32 {
        self.sqrt(&[x])[0]
    }
    /// `torch.log` of a float32 scalar.
    fn log32(&self, x: f32) -> f32 {
        self.log(&[x])[0]
    }
    /// `torch.exp` of a float32 scalar.
    fn exp32(&self, x: f32) -> f32 {
        self.exp(&[x])[0]
    }
}

/// [`F32Math`] in plain Rust: ATen's formulas (linspace from both ends, cumprod accumulated in
/// double) with the platform's IEEE `sqrt` and libm's `ln` / `exp`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdMath;

impl F32Math for StdMath {
    fn linspace(&self, start: f64, end: f64, n: usize) -> Vec<f32> {
        let (start, end) = (start as f32, end as f32);
        if n == 1 {
            return vec![start];
        }
        let step = (end - start) / (n - 1) as f32;
        let half = n / 2;
        (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - i - 1) as f32 }).collect()
    }
    fn cumprod(&self, x: &[f32]) -> Vec<f32> {
        let mut acc = 1f64;
        x.iter()
            .map(|&v| {
                acc *= v as f64;
                acc as f32
            })
            .collect()
    }
    fn sqrt(&self, x: &[f32]) -> Vec<f32> {
        x.iter().map(|v| v.sqrt()).collect()
    }
    fn log(&self, x: &[f32]) -> Vec<f32> {
        x.iter().map(|v| v.ln()).collect()
    }
    fn exp(&self, x: &[f32]) -> Vec<f32> {
        x.iter().map(|v| v.exp()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_meets_both_ends() {
        assert_eq!(StdMath.linspace(0.0, 1.0, 1), vec![0.0]);
        let v = StdMath.linspace(0.00085, 0.012, 1000);
        assert_eq!((v.len(), v[0], v[999]), (1000, 0.00085f32, 0.012f32));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(StdMath.cumprod(&[0.5, 0.5, 2.0]), vec![0.5, 0.25, 0.5]);
    }
}
