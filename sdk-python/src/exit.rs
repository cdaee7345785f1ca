//! Interpreter exit: once the `atexit` hook has run, no thread of the binding attaches to
//! Python again, and the hook waits (GIL released, bounded) for the ones attached.
//!
//! CPython runs `atexit` hooks with the interpreter intact, then marks itself finalizing and
//! tears it down (GC, module teardown). A thread that attaches after that point is either
//! killed by CPython with `pthread_exit` (a forced unwind through Rust frames: abort) or runs
//! Python against a half-destroyed interpreter (SIGSEGV, `PyGILState_Release` fatal errors).
//! Python's own threads are CPython's business; the threads that attach on their own are the
//! runtime's (`ketch-runtime` workers and its blocking pool): they complete asyncio futures
//! (pyo3-async-runtimes' `set_result`) and build exceptions for the core's errors. So every
//! attach from a runtime thread goes through [`attach`] (or holds a [`Pass`]): a pass is
//! refused once [`_at_exit`] has begun, and `_at_exit` returns only when no pass is held (or
//! after [`EXIT_WAIT_MAX`]), so when CPython starts finalizing, no runtime thread is attached
//! or about to attach. What a refused thread would have handed to Python is leaked: the
//! process is exiting, and dropping it would touch Python.
//!
//! Plain atomics, not a mutex: a process may fork while a runtime thread is between the two
//! operations of [`Pass::take`], and the child must not inherit a held lock (it resets the
//! count in [`after_fork_in_child`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// How long `_at_exit` waits for runtime threads attached to Python to detach. Such a thread
/// only converts a value or schedules a callback on an event loop (microseconds once it has
/// the GIL, which the waiting thread releases); the bound is for a Python callback that
/// blocks, so that exit never hangs on it.
pub const EXIT_WAIT_MAX: Duration = Duration::from_secs(2);

/// How often `_at_exit` looks at the count of passes while it waits.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Set by `_at_exit`, never cleared.
static FINALIZING: AtomicBool = AtomicBool::new(false);
/// Passes held: runtime threads attached to Python, or about to attach.
static PASSES_HELD: AtomicUsize = AtomicUsize::new(0);
/// The thread that ran `_at_exit` (it goes on to finalize the interpreter); 0 before.
static FINALIZING_THREAD: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread is one of the runtime's (set by the runtime's thread-start hook).
    static RUNTIME_THREAD: Cell<bool> = const { Cell::new(false) };
    /// A process-unique id of this thread (`std::thread::ThreadId` has no stable integer).
    static THREAD_NUMBER: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, SeqCst)
    };
}

/// Marks the calling thread as a runtime thread (the runtime's `on_thread_start`).
pub fn mark_runtime_thread() {
    RUNTIME_THREAD.with(|flag| flag.set(true));
}

/// Whether the calling thread is one of the runtime's (it may not be attached to Python).
pub fn on_runtime_thread() -> bool {
    RUNTIME_THREAD.with(Cell::get)
}

/// Permission for a runtime thread to attach to Python, held for as long as it may be
/// attached. `None` once the interpreter is exiting.
#[derive(Debug)]
pub struct Pass(());

impl Pass {
    /// A pass, unless `_at_exit` has begun. Sequentially consistent with `_at_exit`'s store
    /// and load: either this sees the flag, or `_at_exit` sees the pass and waits for it.
    pub fn take() -> Option<Pass> {
        PASSES_HELD.fetch_add(1, SeqCst);
        if FINALIZING.load(SeqCst) {
            PASSES_HELD.fetch_sub(1, SeqCst);
            return None;
        }
        Some(Pass(()))
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        PASSES_HELD.fetch_sub(1, SeqCst);
    }
}

/// `Python::attach(f)`, except on a runtime thread once the interpreter is exiting: then
/// `None`, without touching Python. On other threads (Python's own, which call in attached)
/// it always attaches.
pub fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    if !on_runtime_thread() {
        return Some(Python::attach(f));
    }
    let _pass = Pass::take()?;
    Some(Python::attach(f))
}

/// Whether `_at_exit` has run and the calling thread is not the one finalizing the
/// interpreter: a Python thread still running then is a daemon thread, which must not
/// attach again (CPython would kill it inside Rust frames).
pub fn exiting_elsewhere() -> bool {
    FINALIZING.load(SeqCst) && FINALIZING_THREAD.load(SeqCst) != THREAD_NUMBER.with(|n| *n)
}

/// Parks a daemon thread that is detached from Python while the interpreter exits, for the
/// rest of the process's life (CPython 3.14 does the same to its daemon threads). It holds
/// nothing another thread waits for: it is detached, and its futures stay where they are.
pub fn park_for_ever() -> ! {
    loop {
        std::thread::park();
    }
}

/// The `atexit` hook (registered at module init): refuses runtime threads any further
/// attach, then waits with the GIL released until none is attached (at most
/// [`EXIT_WAIT_MAX`]). Runs once per exit; a second call only waits again.
#[pyfunction]
pub fn _at_exit(py: Python<'_>) {
    FINALIZING_THREAD.store(THREAD_NUMBER.with(|n| *n), SeqCst);
    FINALIZING.store(true, SeqCst);
    let drained = py.detach(|| {
        let deadline = Instant::now() + EXIT_WAIT_MAX;
        while PASSES_HELD.load(SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(EXIT_POLL_INTERVAL);
        }
        true
    });
    if !drained {
        eprintln!(
            "ketch: {} runtime thread(s) still attached to Python {EXIT_WAIT_MAX:?} after exit began",
            PASSES_HELD.load(SeqCst)
        );
    }
}

/// In a forked child: the parent's runtime threads, and so their passes, did not come along.
pub fn after_fork_in_child() {
    PASSES_HELD.store(0, SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_refused_once_exit_begins_and_counted_while_held() {
        // One test: the flag is process-wide and never cleared.
        let before = PASSES_HELD.load(SeqCst);
        let pass = Pass::take().expect("not exiting yet");
        assert_eq!(PASSES_HELD.load(SeqCst), before + 1);
        drop(pass);
        assert_eq!(PASSES_HELD.load(SeqCst), before);
        FINALIZING.store(true, SeqCst);
        assert!(Pass::take().is_none());
        assert_eq!(
            PASSES_HELD.load(SeqCst),
            before,
            "a refused pass is not counted"
        );
    }
}
