//! Mapped checkpoint files that shrink under runner (truncated, or replaced in place, by another
//! process) make the next read of a lost page raise SIGBUS, which would kill the process without
//! a word. Every mapping registers its address range and file here; a SIGBUS inside one prints an
//! error naming the file and exits 1. A SIGBUS elsewhere keeps its default action.
//!
//! The handler only reads atomics and calls `write` and `_exit` (async-signal-safe); messages are
//! built when the mapping is registered.

use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    msg: AtomicPtr<u8>,
    msg_len: AtomicUsize,
}

static REGISTRY: [Slot; SLOTS] = [const { Slot { start: AtomicUsize::new(0), len: AtomicUsize::new(0), msg: AtomicPtr::new(std::ptr::null_mut()), msg_len: AtomicUsize::new(0) } }; SLOTS];
static INSTALL: Once = Once::new();

/// Unregisters its range when dropped (before the mapping itself goes).
#[derive(Debug)]
pub struct Watch {
    slot: Option<usize>,
}

/// Registers `len` bytes at `ptr`, mapped from `path`.
pub fn watch(ptr: *const u8, len: usize, path: &Path) -> Watch {
    INSTALL.call_once(install);
    let msg = format!("error: `{}` changed while runner was reading it (truncated or rewritten in place by another process): a mapped page of it is gone; nothing was written\n", path.display())
        .into_bytes()
        .into_boxed_slice();
    let msg_len = msg.len();
    let msg = Box::into_raw(msg) as *mut u8;
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.start.compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            s.msg.store(msg, Ordering::Release);
            s.msg_len.store(msg_len, Ordering::Release);
            s.len.store(len, Ordering::Release);
            s.start.store(ptr as usize, Ordering::Release);
            return Watch { slot: Some(i) };
        }
    }
    // Every slot taken: this mapping goes unwatched (the default SIGBUS action applies).
    // SAFETY: `msg` came from Box::into_raw above with this length.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(msg, msg_len)) });
    Watch { slot: None }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Some(i) = self.slot else { return };
        let s = &REGISTRY[i];
        s.start.store(usize::MAX, Ordering::Release);
        let msg = s.msg.swap(std::ptr::null_mut(), Ordering::AcqRel);
        let len = s.msg_len.load(Ordering::Acquire);
        s.len.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
        if !msg.is_null() {
            // SAFETY: the pointer and length registered in `watch`.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(msg, len)) });
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in REGISTRY.iter() {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || start == usize::MAX || addr < start || addr - start >= s.len.load(Ordering::Acquire) {
            continue;
        }
        let msg = s.msg.load(Ordering::Acquire);
        if !msg.is_null() {
            // SAFETY: write and _exit are async-signal-safe; the message outlives the slot's use.
            unsafe { libc::write(2, msg as *const libc::c_void, s.msg_len.load(Ordering::Acquire)) };
        }
        unsafe { libc::_exit(1) };
    }
    // Not a checkpoint mapping: back to the default action, which the faulting access, run again
    // on return, then takes.
    // SAFETY: resetting a signal disposition.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install() {
    // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}
