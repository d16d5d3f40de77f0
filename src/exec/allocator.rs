//! Device memory as PyTorch's caching allocator counts it (`torch.cuda.memory_stats()`:
//! `reserved_bytes.all.peak` is what `max_memory_reserved()` returns), read through a small C++
//! shim (src/exec/shim/allocator_stats.cpp, built by build.rs): tch exposes no memory stats, and
//! nvidia-smi's figure (the whole process: CUDA context, libraries, cache) cannot be compared
//! with diffusers' own measure. Host memory and the process's age from /proc.

use std::ffi::{c_char, c_int, CStr};

use serde::Serialize;

extern "C" {
    fn runner_allocator_stats(device: c_int, out: *mut i64, err: *mut c_char, errlen: usize) -> c_int;
}

/// One device's caching-allocator counters, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Held from the driver now (`torch.cuda.memory_reserved()`).
    pub reserved_bytes: u64,
    /// The most held at once since the process started (`torch.cuda.max_memory_reserved()`).
    pub peak_reserved_bytes: u64,
    /// In tensors now (`torch.cuda.memory_allocated()`).
    pub allocated_bytes: u64,
    /// The most in tensors at once since the process started (`torch.cuda.max_memory_allocated()`).
    pub peak_allocated_bytes: u64,
}

fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<bool, String> {
    let mut err = [0 as c_char; 512];
    match f(err.as_mut_ptr(), err.len()) {
        0 => Ok(true),
        1 => Ok(false),
        _ => Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().lines().next().unwrap_or("").to_string()),
    }
}

/// The counters of CUDA device `device`; `None` when libtorch has no accelerator (a CPU build or
/// machine).
pub fn stats(device: usize) -> Result<Option<AllocatorStats>, String> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has the 4 slots the shim writes; `err`/`errlen` come from `call`.
    let present = call(|err, len| unsafe { runner_allocator_stats(device as c_int, out.as_mut_ptr(), err, len) })?;
    let b = |v: i64| v.max(0) as u64;
    Ok(present.then(|| AllocatorStats { reserved_bytes: b(out[0]), peak_reserved_bytes: b(out[1]), allocated_bytes: b(out[2]), peak_allocated_bytes: b(out[3]) }))
}

/// This process's resident memory now and at its peak (`VmRSS`, `VmHWM`), in bytes; `None`
/// where /proc is not there.
pub fn host_rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map(|k| k * 1024);
    Some((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Seconds since this process started (`/proc/self/stat`'s start time against `/proc/uptime`,
/// 10 ms resolution): start-up before `main` (the dynamic loader mapping libtorch) included.
pub fn process_age_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let start_ticks: f64 = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hz > 0.0).then(|| (uptime - start_ticks / hz).max(0.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cpu_build_has_no_accelerator_counters_and_says_so_without_failing() {
        if tch::Cuda::is_available() {
            return; // a GPU machine: scripts/gpu-check.sh compares the figures with diffusers'
        }
        assert_eq!(super::stats(0), Ok(None));
        let (rss, peak) = super::host_rss().expect("linux");
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
        let age = super::process_age_s().expect("linux");
        assert!((0.0..3600.0).contains(&age), "{age}");
    }
}
