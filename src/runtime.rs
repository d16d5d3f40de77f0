//! libtorch start-up: one binary uses CUDA where present and the CPU elsewhere.

use std::sync::OnceLock;

use serde::Serialize;

/// The libtorch version this binary was built against (read from the wheel at build time).
pub const LIBTORCH_VERSION: &str = env!("RUNNER_LIBTORCH_VERSION");

/// Process-wide libtorch settings that must be in place before its first allocation. Large CPU
/// tensors (weights, their conversions) are backed by transparent huge pages unless the user
/// chose otherwise: first-touch page faults otherwise halve load throughput (benches/).
pub fn configure_allocator() {
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        // Called at the start of main, before any thread exists.
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
}

/// glibc malloc's mmap threshold for a phase of the run. While components load: fixed at 1 MiB,
/// so that loading's temporaries (a LoRA pair's merge, dtype conversions) go back to the system
/// when freed instead of fragmenting the heap among the weights kept (benches/lora_fuse.sh: a
/// fused SDXL LoRA's peak RSS over base + adapter fell from 0.26 to 0.08 GiB). After loading:
/// 32 MiB, the ceiling glibc's own dynamic threshold settles at as a denoising loop frees its
/// activations, so steps reuse heap memory without page faults. The trim threshold with it, as
/// glibc's dynamic rule would set it (twice the mmap threshold; a fixed mmap threshold otherwise
/// leaves it at 128 KiB, so that every step gave its freed heap top back and faulted it in again:
/// `perf` saw the kernel clearing pages 31 vs 103 samples per two 512x512 img2img calls, diffusers
/// 14). `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment (glibc's own
/// settings) win.
pub fn malloc_phase(loading: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; any value is valid.
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, if loading { 1 << 20 } else { 32 << 20 });
            }
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, if loading { 128 << 10 } else { 64 << 20 });
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = loading;
}

/// Loads libtorch's CUDA backend if it is installed. With `--as-needed` linking the binary does
/// not depend on `libtorch_cuda.so`, so its kernels register only when it is loaded by hand;
/// on a CPU-only install this fails (missing CUDA libraries) and runner carries on on the CPU.
/// Idempotent; returns whether the CUDA backend was loaded.
pub fn init() -> bool {
    static CUDA: OnceLock<bool> = OnceLock::new();
    *CUDA.get_or_init(|| {
        // SAFETY: dlopen/dlerror with a NUL-terminated name; the handle is kept for the process's life.
        unsafe {
            let handle = libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
            if handle.is_null() {
                let err = libc::dlerror();
                let msg = if err.is_null() { "unknown error".into() } else { std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned() };
                tracing::debug!("CUDA backend not loaded, running on CPU: {msg}");
                false
            } else {
                tracing::debug!("loaded libtorch_cuda.so");
                true
            }
        }
    })
}

/// What libtorch sees on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct TorchInfo {
    pub libtorch_version: &'static str,
    pub cuda_backend_loaded: bool,
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    pub cpu_threads: i32,
}

pub fn info() -> TorchInfo {
    let loaded = init();
    TorchInfo {
        libtorch_version: LIBTORCH_VERSION,
        cuda_backend_loaded: loaded,
        cuda_available: tch::Cuda::is_available(),
        cuda_device_count: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cpu_threads: tch::get_num_threads(),
    }
}

/// Runs one small op on each available backend; an error names the backend that failed.
pub fn smoke_test() -> anyhow::Result<()> {
    use anyhow::Context;
    let run = |device: tch::Device| -> anyhow::Result<f64> {
        let x = tch::Tensor::f_arange(16i64, (tch::Kind::Float, device))?;
        let y = x.f_matmul(&x)?.f_to_device(tch::Device::Cpu)?;
        Ok(y.f_double_value(&[])?)
    };
    let cpu = run(tch::Device::Cpu).context("libtorch CPU op failed")?;
    anyhow::ensure!(cpu == 1240.0, "libtorch CPU op gave {cpu}, expected 1240");
    if init() && tch::Cuda::is_available() {
        let gpu = run(tch::Device::Cuda(0)).context("libtorch CUDA op on cuda:0 failed")?;
        anyhow::ensure!(gpu == cpu, "CUDA op gave {gpu}, CPU gave {cpu}");
    }
    Ok(())
}
