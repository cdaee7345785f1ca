//! The tokio runtime the native module runs the client core on, and the helpers that wait
//! for the core's futures from Python threads (GIL released, signals checked) or hand them
//! to asyncio (pyo3-async-runtimes).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;
use pyo3_async_runtimes::generic::{ContextExt, Runtime as AsyncRuntime};
use tokio::runtime::Runtime;

/// How often a blocked call wakes to run Python's signal handlers (Ctrl-C) and rebalance
/// callbacks.
pub const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The runtime of this process: created on first use, and again in a forked child, whose
/// copy of the parent's runtime has no threads. Leaked on purpose: a runtime is never shut
/// down, so interpreter exit never waits for it, and a child never touches the parent's.
///
/// Only called with the GIL held: a Python-level `fork` happens while the forking thread holds
/// the GIL, so no other thread can be inside this lock when the process forks.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// This process's runtime.
pub fn runtime(_py: Python<'_>) -> &'static Runtime {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, runtime)) = *slot
        && owner == pid
    {
        return runtime;
    }
    let runtime: &'static Runtime = Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("ketch-runtime")
            .on_thread_start(crate::exit::mark_runtime_thread)
            .enable_all()
            .build()
            .expect("building the ketch tokio runtime"),
    ));
    *slot = Some((pid, runtime));
    runtime
}

/// Called by `os.register_at_fork(after_in_child=...)` (see `ketch/__init__.py`) on the thread
/// that forked: gives it a fresh thread RNG. quinn draws connection IDs from it, and a child
/// that kept its parent's RNG state would pick the very IDs of the parent's next connection:
/// the broker then routes the parent's handshake to the child's connection and it times out.
#[pyfunction]
pub fn _after_fork_in_child() -> PyResult<()> {
    crate::exit::after_fork_in_child();
    rand::rng().reseed().map_err(|error| {
        pyo3::exceptions::PyOSError::new_err(format!(
            "reseeding the thread RNG after fork: {error}"
        ))
    })
}

fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// The runtime of this process, for the tasks pyo3-async-runtimes spawns: from the Python
/// thread that creates the awaitable (attached, so attaching is only a count, which keeps
/// every use of [`RUNTIME`] under the GIL), and from the runtime's own threads (when the
/// future is done), which must not attach to find it: they are inside it.
fn runtime_handle() -> tokio::runtime::Handle {
    if crate::exit::on_runtime_thread() {
        tokio::runtime::Handle::current()
    } else {
        Python::attach(runtime).handle().clone()
    }
}

/// Waits for `fut` from a Python thread: one poll with the GIL held (most calls finish there),
/// then with the GIL released, waking every [`SIGNAL_CHECK_INTERVAL`] to run signal handlers
/// (a `KeyboardInterrupt` drops the future: the core's futures are cancel-safe) and `tick`.
/// Returns `None` when `timeout` passes first.
pub fn wait_with<F>(
    py: Python<'_>,
    fut: F,
    timeout: Option<Duration>,
    mut tick: impl FnMut(Python<'_>) -> PyResult<()>,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    let runtime = runtime(py);
    // In an `Option` so that a daemon thread parked at exit can drop it (see below).
    let mut fut = pin!(Some(fut));
    {
        let _entered = runtime.enter();
        let first = fut
            .as_mut()
            .as_pin_mut()
            .expect("not dropped yet")
            .poll(&mut Context::from_waker(Waker::noop()));
        if let Poll::Ready(output) = first {
            return Ok(Some(output));
        }
    }
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    loop {
        let step = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                left.min(SIGNAL_CHECK_INTERVAL)
            }
            None => SIGNAL_CHECK_INTERVAL,
        };
        let output = py.detach(|| {
            let running = fut
                .as_mut()
                .as_pin_mut()
                .expect("dropped only before parking");
            let output =
                runtime.block_on(async move { tokio::time::timeout(step, running).await.ok() });
            if crate::exit::exiting_elsewhere() {
                // A daemon thread while the interpreter exits: attaching again would be
                // fatal, so it parks for good, done or not. It drops the call first, so
                // that nothing the exiting thread may still use (a delivery's lock, the
                // consumer) stays held by a thread that never returns.
                drop(output);
                fut.set(None);
                crate::exit::park_for_ever();
            }
            output
        });
        if let Some(output) = output {
            return Ok(Some(output));
        }
        py.check_signals()?;
        tick(py)?;
    }
}

/// [`wait_with`] without a time limit or a tick.
pub fn wait<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    Ok(wait_with(py, fut, None, |_| Ok(()))?.expect("no timeout"))
}

/// Runs `fut` on this process's runtime, as an asyncio awaitable of the running loop.
pub fn into_awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    runtime(py);
    pyo3_async_runtimes::generic::future_into_py::<KetchRuntime, F, T>(py, fut)
}

/// pyo3-async-runtimes' view of [`runtime`]: its own tokio runtime is a process-wide
/// `OnceCell`, which a forked child would inherit dead.
pub struct KetchRuntime;

tokio::task_local! {
    static TASK_LOCALS: std::cell::OnceCell<TaskLocals>;
}

impl AsyncRuntime for KetchRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle = tokio::task::JoinHandle<()>;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        runtime_handle().spawn(fut)
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        // pyo3-async-runtimes attaches in `f` to complete the asyncio future; once the
        // interpreter exits, `f` (and the Python objects it holds) is leaked instead.
        runtime_handle().spawn_blocking(move || match crate::exit::Pass::take() {
            Some(_pass) => f(),
            None => std::mem::forget(f),
        })
    }
}

impl ContextExt for KetchRuntime {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        let cell = std::cell::OnceCell::new();
        let _ = cell.set(locals);
        Box::pin(TASK_LOCALS.scope(cell, fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        TASK_LOCALS
            .try_with(|cell| cell.get().cloned())
            .unwrap_or_default()
    }
}
