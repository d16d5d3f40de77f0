//! A side CUDA stream for `group` offload's prefetch, through the CUDA driver API (dlopen'ed:
//! tch exposes no streams). The next group's host-to-device copies run on it while the current
//! group's kernels run on libtorch's default (null) stream; events order the two:
//! - before the copies, the side stream waits for what the null stream has queued so far, so a
//!   destination block the caching allocator reused is no longer read by earlier kernels;
//! - before the group runs, the null stream waits for the copies.
//!
//! Opt-in (`RUNNER_PREFETCH_STREAM=1`) until a GPU run has checked it against the default path
//! (`scripts/gpu-check.sh` runs both); any driver failure falls back to copies on the null stream.

use std::ffi::{c_void, CStr};

type CuResult = i32;
type CuStream = *mut c_void;
type CuEvent = *mut c_void;
type CuContext = *mut c_void;

const CU_STREAM_NON_BLOCKING: u32 = 1;
const CU_EVENT_DISABLE_TIMING: u32 = 2;

struct Driver {
    primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, i32) -> CuResult,
    device_get: unsafe extern "C" fn(*mut i32, i32) -> CuResult,
    ctx_push: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_pop: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    stream_create: unsafe extern "C" fn(*mut CuStream, u32) -> CuResult,
    event_create: unsafe extern "C" fn(*mut CuEvent, u32) -> CuResult,
    event_record: unsafe extern "C" fn(CuEvent, CuStream) -> CuResult,
    stream_wait_event: unsafe extern "C" fn(CuStream, CuEvent, u32) -> CuResult,
    memcpy_htod_async: unsafe extern "C" fn(u64, *const c_void, usize, CuStream) -> CuResult,
    event_destroy: unsafe extern "C" fn(CuEvent) -> CuResult,
    stream_destroy: unsafe extern "C" fn(CuStream) -> CuResult,
    stream_synchronize: unsafe extern "C" fn(CuStream) -> CuResult,
}

fn driver() -> Option<&'static Driver> {
    static DRIVER: std::sync::OnceLock<Option<Driver>> = std::sync::OnceLock::new();
    DRIVER
        .get_or_init(|| {
            // SAFETY: symbols of the CUDA driver API with their documented C signatures; the
            // library stays loaded for the process's life.
            unsafe {
                let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                if lib.is_null() {
                    return None;
                }
                Some(Driver {
                    primary_ctx_retain: sym(lib, c"cuDevicePrimaryCtxRetain")?,
                    device_get: sym(lib, c"cuDeviceGet")?,
                    ctx_push: sym(lib, c"cuCtxPushCurrent_v2")?,
                    ctx_pop: sym(lib, c"cuCtxPopCurrent_v2")?,
                    stream_create: sym(lib, c"cuStreamCreate")?,
                    event_create: sym(lib, c"cuEventCreate")?,
                    event_record: sym(lib, c"cuEventRecord")?,
                    stream_wait_event: sym(lib, c"cuStreamWaitEvent")?,
                    memcpy_htod_async: sym(lib, c"cuMemcpyHtoDAsync_v2")?,
                    event_destroy: sym(lib, c"cuEventDestroy_v2")?,
                    stream_destroy: sym(lib, c"cuStreamDestroy_v2")?,
                    stream_synchronize: sym(lib, c"cuStreamSynchronize")?,
                })
            }
        })
        .as_ref()
}

unsafe fn sym<T: Copy>(lib: *mut c_void, name: &CStr) -> Option<T> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        None
    } else {
        Some(std::mem::transmute_copy(&p))
    }
}

/// Runs `f` with `ctx` current on this thread; `None` if it could not be made current (then
/// nothing is popped: the thread's own context, libtorch's, stays as it was).
fn within<R>(d: &Driver, ctx: CuContext, f: impl FnOnce() -> R) -> Option<R> {
    // SAFETY: push/pop of a retained primary context around driver calls on this thread.
    unsafe {
        if (d.ctx_push)(ctx) != 0 {
            return None;
        }
        let r = f();
        let mut popped = std::ptr::null_mut();
        (d.ctx_pop)(&mut popped);
        Some(r)
    }
}

/// Whether the user asked for the side stream.
pub fn requested() -> bool {
    std::env::var("RUNNER_PREFETCH_STREAM").is_ok_and(|v| v == "1")
}

/// A non-blocking stream on one device, in that device's primary context (libtorch's).
pub struct SideStream {
    driver: &'static Driver,
    ctx: CuContext,
    stream: CuStream,
    device: usize,
}

/// Copies in flight on the side stream; the null stream waits for `done` before using them.
pub struct Pending {
    driver: &'static Driver,
    done: CuEvent,
}

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: the event was created by this driver; destroying a recorded event is allowed
        // (its resources go when the work completes).
        unsafe {
            (self.driver.event_destroy)(self.done);
        }
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: as for events: pending work completes before the stream's resources go.
        self.within(|| unsafe {
            (self.driver.stream_destroy)(self.stream);
        });
    }
}

impl SideStream {
    pub fn new(device: usize) -> Option<SideStream> {
        let d = driver()?;
        // SAFETY: driver calls with valid out-pointers; the context is the device's primary one,
        // which libtorch has initialised (the weights' placeholders live there already).
        unsafe {
            let (mut dev, mut ctx, mut stream) = (0i32, std::ptr::null_mut(), std::ptr::null_mut());
            if (d.device_get)(&mut dev, device as i32) != 0 || (d.primary_ctx_retain)(&mut ctx, dev) != 0 {
                return None;
            }
            // Non-blocking: no implicit synchronisation with the legacy null stream libtorch uses.
            if within(d, ctx, || (d.stream_create)(&mut stream, CU_STREAM_NON_BLOCKING) == 0) != Some(true) {
                return None;
            }
            Some(SideStream { driver: d, ctx, stream, device })
        }
    }

    fn within<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        within(self.driver, self.ctx, f)
    }

    /// Queues `host -> device` copies (pairs of device destination, pinned host source, bytes)
    /// behind everything the null stream has queued so far; `None` if the driver refused, in which
    /// case nothing may be assumed about the destinations.
    pub fn copy(&self, copies: &[(u64, *const c_void, usize)]) -> Option<Pending> {
        let d = self.driver;
        self.within(|| {
            // SAFETY: events created here; device pointers are live allocations of at least
            // `bytes` (the caller holds the tensors), host pointers are pinned and outlive the run.
            unsafe {
                let (mut ready, mut done) = (std::ptr::null_mut(), std::ptr::null_mut());
                if (d.event_create)(&mut ready, CU_EVENT_DISABLE_TIMING) != 0 {
                    return None;
                }
                let ordered = (d.event_record)(ready, std::ptr::null_mut()) == 0 && (d.stream_wait_event)(self.stream, ready, 0) == 0;
                (d.event_destroy)(ready);
                if !ordered || (d.event_create)(&mut done, CU_EVENT_DISABLE_TIMING) != 0 {
                    return None;
                }
                let pending = Pending { driver: d, done };
                let queued = copies.iter().all(|&(dst, src, bytes)| (d.memcpy_htod_async)(dst, src, bytes, self.stream) == 0);
                if !queued || (d.event_record)(done, self.stream) != 0 {
                    // Some copies may be queued: finish them before the caller frees the
                    // destinations.
                    (d.stream_synchronize)(self.stream);
                    return None;
                }
                Some(pending)
            }
        })
        .flatten()
    }

    /// Blocks the host until the side stream's work is done.
    pub fn synchronize(&self) {
        let d = self.driver;
        // SAFETY: a stream of this context.
        let done = self.within(|| unsafe { (d.stream_synchronize)(self.stream) == 0 });
        if done != Some(true) {
            // Every stream of the device, ours included.
            tch::Cuda::synchronize(self.device as i64);
        }
    }

    /// The null stream waits for `p`'s copies before whatever is queued next.
    pub fn wait(&self, p: &Pending) -> bool {
        let d = self.driver;
        // SAFETY: a recorded event of this context.
        self.within(|| unsafe { (d.stream_wait_event)(std::ptr::null_mut(), p.done, 0) == 0 }) == Some(true)
    }
}
