//! The wasmtime side: one `Engine` (pooling allocator, epoch interruption, a ticker thread),
//! upload validation, and instances that run one batch at a time under the limits.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, Linker, Memory, Module,
    OptLevel, PoolingAllocationConfig, ResourceLimiter, Store, Trap, TypedFunc, ValType,
};

use super::FailureReason;
use super::abi::{self, Output};

/// How often the ticker advances the engine's epoch; batch deadlines are counted in ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Log messages a module may write per call; the rest are counted and dropped.
pub const LOG_MESSAGES_PER_CALL_MAX: u32 = 16;
/// Bytes of one log message kept; the rest is cut.
pub const LOG_MESSAGE_BYTES_MAX: usize = 1024;
/// Table elements an instance may have (tables only hold function references).
const TABLE_ELEMENTS_MAX: usize = 100_000;
const WASM_PAGE_BYTES: u64 = 64 * 1024;

/// Limits per instance, from the broker configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes_max: usize,
    pub batch_time_ms_max: u64,
    pub output_bytes_max: usize,
    pub module_bytes_max: usize,
    /// Instances alive at once across the broker (pool slots).
    pub instances_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_bytes_max: 32 * 1024 * 1024,
            batch_time_ms_max: 100,
            output_bytes_max: 8 * 1024 * 1024,
            module_bytes_max: 16 * 1024 * 1024,
            instances_max: 256,
        }
    }
}

/// Tracks memory growth against the limit and remembers a refusal, so a trap that follows
/// (a Rust guest aborts when allocation fails) is reported as the limit it is.
#[derive(Debug)]
struct HostState {
    memory_bytes_max: usize,
    memory_refused: Option<usize>,
    module: Arc<str>,
    logs_left: u32,
    logs_dropped: u32,
    panic_message: Option<String>,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes_max {
            self.memory_refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] while guest code runs somewhere, and
/// sleeps while none does: an idle broker has no thread waking 200 times a second.
///
/// A call enters ([`EpochTicker::enter`]) before it arms its deadline; the first one to
/// enter wakes the ticker (an unpark before the ticker parks is kept, so none is lost).
/// Epochs only advance while some call runs, so a deadline of `n` ticks is still at least
/// `n - 1` ticks of that call's time.
#[derive(Debug, Default)]
struct EpochTicker {
    running: AtomicUsize,
    stop: AtomicBool,
    thread: OnceLock<Thread>,
}

impl EpochTicker {
    fn run(&self, engine: &Engine) {
        while !self.stop.load(Ordering::Acquire) {
            if self.running.load(Ordering::Acquire) == 0 {
                std::thread::park();
                continue;
            }
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        }
    }

    fn enter(self: &Arc<Self>) -> Running {
        if self.running.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Running(self.clone())
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// Guest code running: the epoch ticker ticks until the last of these is dropped.
#[derive(Debug)]
struct Running(Arc<EpochTicker>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The broker's one engine, with its epoch ticker thread.
#[derive(Debug)]
pub struct FilterEngine {
    engine: Engine,
    linker: Linker<HostState>,
    pub limits: Limits,
    ticker: Arc<EpochTicker>,
}

impl Drop for FilterEngine {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

impl FilterEngine {
    pub fn new(limits: Limits) -> Result<FilterEngine, String> {
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_core_instances(limits.instances_max)
            .total_memories(limits.instances_max)
            .total_tables(limits.instances_max)
            .max_memory_size(limits.memory_bytes_max)
            .table_elements(TABLE_ELEMENTS_MAX);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(|e| format!("starting wasmtime: {e}"))?;
        let mut linker = Linker::new(&engine);
        linker
            .func_wrap(abi::IMPORT_MODULE, abi::IMPORT_LOG, host_log)
            .map_err(|e| format!("defining ketch.log: {e}"))?;
        let ticker = Arc::new(EpochTicker::default());
        let ticker_engine = engine.clone();
        let thread_ticker = ticker.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || thread_ticker.run(&ticker_engine))
            .map_err(|e| format!("starting the epoch ticker: {e}"))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(FilterEngine {
            engine,
            linker,
            limits,
            ticker,
        })
    }

    /// Validates and compiles an uploaded module; returns the precompiled artifact (what the
    /// registry stores and later deserializes) and the module.
    pub fn compile(&self, bytes: &[u8]) -> Result<(Vec<u8>, Module), String> {
        if bytes.len() > self.limits.module_bytes_max {
            return Err(format!(
                "module is {} bytes, the limit (filter_module_bytes_max) is {}",
                bytes.len(),
                self.limits.module_bytes_max
            ));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err("not a WebAssembly binary (no \\0asm magic at offset 0)".into());
        }
        self.check_memory_minimum(bytes)?;
        let artifact = self
            .engine
            .precompile_module(bytes)
            .map_err(|e| format!("does not compile: {}", error_text(&e)))?;
        let module = self.deserialize(&artifact)?;
        self.check_shape(&module)?;
        self.check_abi_version(&module)?;
        Ok((artifact, module))
    }

    /// The declared memory minimum, checked before compiling (the pooling allocator would
    /// refuse the module later with a less useful message).
    fn check_memory_minimum(&self, bytes: &[u8]) -> Result<(), String> {
        for minimum_pages in declared_memory_minimums(bytes) {
            let minimum = minimum_pages.saturating_mul(WASM_PAGE_BYTES);
            if minimum > self.limits.memory_bytes_max as u64 {
                return Err(format!(
                    "memory minimum of {minimum} bytes exceeds the limit (filter_memory_bytes_max) of {} bytes",
                    self.limits.memory_bytes_max
                ));
            }
        }
        Ok(())
    }

    /// Loads a module this engine precompiled.
    pub fn deserialize(&self, artifact: &[u8]) -> Result<Module, String> {
        // SAFETY: `artifact` is the output of `precompile_module` of an engine with this
        // configuration, read back from the broker's own data directory (never from a
        // client); wasmtime checks its header for version and configuration compatibility.
        #[allow(unsafe_code)]
        let module = unsafe { Module::deserialize(&self.engine, artifact) };
        module.map_err(|e| format!("loading the precompiled module: {}", error_text(&e)))
    }

    /// Imports, exports and memory: what can be checked without running anything.
    fn check_shape(&self, module: &Module) -> Result<(), String> {
        for import in module.imports() {
            let allowed = import.module() == abi::IMPORT_MODULE && import.name() == abi::IMPORT_LOG;
            if !allowed {
                return Err(format!(
                    "imports `{}.{}`, but a filter may import only `{}.{}` (no WASI)",
                    import.module(),
                    import.name(),
                    abi::IMPORT_MODULE,
                    abi::IMPORT_LOG
                ));
            }
            let ok = match import.ty() {
                ExternType::Func(f) => {
                    f.params().all(|p| matches!(p, ValType::I32))
                        && f.params().len() == 3
                        && f.results().len() == 0
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "imports `{}.{}` with the wrong type; it is (func (param i32 i32 i32))",
                    abi::IMPORT_MODULE,
                    abi::IMPORT_LOG
                ));
            }
        }
        let funcs: [(&str, &[ValType], &[ValType], &str); 4] = [
            (
                abi::EXPORT_ABI_VERSION,
                &[],
                &[ValType::I32],
                "(func (result i32))",
            ),
            (
                abi::EXPORT_ALLOC,
                &[ValType::I32],
                &[ValType::I32],
                "(func (param i32) (result i32))",
            ),
            (
                abi::EXPORT_INIT,
                &[ValType::I32, ValType::I32],
                &[ValType::I64],
                "(func (param i32 i32) (result i64))",
            ),
            (
                abi::EXPORT_PROCESS,
                &[ValType::I32, ValType::I32],
                &[ValType::I64],
                "(func (param i32 i32) (result i64))",
            ),
        ];
        for (name, params, results, text) in funcs {
            let Some(ty) = module.get_export(name) else {
                return Err(format!("missing the ABI export `{name}` {text}"));
            };
            let ok = match ty {
                ExternType::Func(f) => {
                    f.params().len() == params.len()
                        && f.results().len() == results.len()
                        && f.params().zip(params).all(|(a, b)| a.matches(b))
                        && f.results().zip(results).all(|(a, b)| a.matches(b))
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "export `{name}` has the wrong type; it must be {text}"
                ));
            }
        }
        match module.get_export(abi::EXPORT_MEMORY) {
            Some(ExternType::Memory(memory)) => {
                if memory.is_64() || memory.is_shared() {
                    return Err("`memory` must be a plain 32-bit, unshared memory".into());
                }
                let minimum = memory.minimum().saturating_mul(WASM_PAGE_BYTES);
                if minimum > self.limits.memory_bytes_max as u64 {
                    return Err(format!(
                        "memory minimum of {minimum} bytes exceeds the limit (filter_memory_bytes_max) of {} bytes",
                        self.limits.memory_bytes_max
                    ));
                }
            }
            _ => return Err("missing the ABI export `memory`".into()),
        }
        Ok(())
    }

    fn check_abi_version(&self, module: &Module) -> Result<(), String> {
        let mut instance = self
            .instantiate(module, "upload check".into())
            .map_err(|reason| format!("cannot be instantiated: {reason}"))?;
        let version = instance
            .abi_version()
            .map_err(|reason| format!("`ketch_abi_version` failed: {reason}"))?;
        if version != abi::ABI_VERSION {
            return Err(format!(
                "ABI version {version} is not supported (this broker speaks version {})",
                abi::ABI_VERSION
            ));
        }
        Ok(())
    }

    /// A fresh instance with its own store and limits.
    pub fn instantiate(&self, module: &Module, name: Arc<str>) -> Result<Instance, FailureReason> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                memory_bytes_max: self.limits.memory_bytes_max,
                memory_refused: None,
                module: name,
                logs_left: LOG_MESSAGES_PER_CALL_MAX,
                logs_dropped: 0,
                panic_message: None,
            },
        );
        store.limiter(|state| state);
        store.epoch_deadline_trap();
        let running = self.ticker.enter();
        store.set_epoch_deadline(self.deadline_ticks());
        let instance = self
            .linker
            .instantiate(&mut store, module)
            .map_err(|e| classify(&e, store.data(), self.limits.batch_time_ms_max))?;
        drop(running);
        let typed = |store: &mut Store<HostState>, name: &str| {
            instance
                .get_func(&mut *store, name)
                .ok_or_else(|| FailureReason::BadModule(format!("missing export `{name}`")))
        };
        let memory = instance
            .get_memory(&mut store, abi::EXPORT_MEMORY)
            .ok_or_else(|| FailureReason::BadModule("missing export `memory`".into()))?;
        let bad = |e: wasmtime::Error| FailureReason::BadModule(error_text(&e));
        let abi_version = typed(&mut store, abi::EXPORT_ABI_VERSION)?
            .typed::<(), i32>(&store)
            .map_err(bad)?;
        let alloc = typed(&mut store, abi::EXPORT_ALLOC)?
            .typed::<i32, i32>(&store)
            .map_err(bad)?;
        let init = typed(&mut store, abi::EXPORT_INIT)?
            .typed::<(i32, i32), i64>(&store)
            .map_err(bad)?;
        let process = typed(&mut store, abi::EXPORT_PROCESS)?
            .typed::<(i32, i32), i64>(&store)
            .map_err(bad)?;
        Ok(Instance {
            store,
            memory,
            abi_version,
            alloc,
            init,
            process,
            deadline_ticks: self.deadline_ticks(),
            ticker: self.ticker.clone(),
            batch_time_ms_max: self.limits.batch_time_ms_max,
            output_bytes_max: self.limits.output_bytes_max,
        })
    }

    fn deadline_ticks(&self) -> u64 {
        // +1: the tick in progress when the call starts may be nearly over.
        self.limits
            .batch_time_ms_max
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            .max(1)
            + 1
    }
}

/// The minimum page counts of the memories a module's memory section declares (section 5 of
/// the binary format). Malformed input yields what was read so far: compiling reports it.
fn declared_memory_minimums(bytes: &[u8]) -> Vec<u64> {
    fn leb(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut minimums = Vec::new();
    let mut at = 8; // magic and version
    while at < bytes.len() {
        let id = bytes[at];
        at += 1;
        let Some(size) = leb(bytes, &mut at) else {
            break;
        };
        let end = at.saturating_add(size as usize).min(bytes.len());
        if id == 5 {
            let mut p = at;
            let count = leb(bytes, &mut p).unwrap_or(0);
            for _ in 0..count {
                let Some(&flags) = bytes.get(p) else { break };
                p += 1;
                let Some(minimum) = leb(bytes, &mut p) else {
                    break;
                };
                minimums.push(minimum);
                if flags & 0x01 != 0 && leb(bytes, &mut p).is_none() {
                    break;
                }
                if flags & 0x08 != 0 && leb(bytes, &mut p).is_none() {
                    break;
                }
            }
        }
        at = end;
    }
    minimums
}

/// The `ketch.log` import: bounds-checked, rate-limited; a panic-level message is kept as the
/// reason of the trap that follows it.
fn host_log(
    mut caller: Caller<'_, HostState>,
    level: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<()> {
    let Some(memory) = caller
        .get_export(abi::EXPORT_MEMORY)
        .and_then(|e| e.into_memory())
    else {
        return Ok(());
    };
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = memory.data(&caller);
    let Some(bytes) = data.get(start..start.saturating_add(len)) else {
        return Err(wasmtime::Error::msg(format!(
            "ketch.log called with bytes {start}..{} outside memory of {} bytes",
            start.saturating_add(len),
            data.len()
        )));
    };
    let text =
        String::from_utf8_lossy(&bytes[..bytes.len().min(LOG_MESSAGE_BYTES_MAX)]).into_owned();
    let state = caller.data_mut();
    if level == abi::LOG_LEVEL_PANIC {
        state.panic_message = Some(text);
        return Ok(());
    }
    if state.logs_left == 0 {
        state.logs_dropped += 1;
        return Ok(());
    }
    state.logs_left -= 1;
    let module = state.module.clone();
    match level {
        0 => tracing::debug!(filter = %module, "{text}"),
        1 => tracing::info!(filter = %module, "{text}"),
        2 => tracing::warn!(filter = %module, "{text}"),
        _ => tracing::error!(filter = %module, "{text}"),
    }
    Ok(())
}

/// The readable text of a wasmtime error: its causes, without the backtrace.
fn error_text(e: &wasmtime::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let line = cause.to_string();
        let line = line.lines().next().unwrap_or_default();
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(line);
    }
    text
}

/// Why a call into the guest failed, from the error and what the host state saw.
fn classify(e: &wasmtime::Error, state: &HostState, batch_time_ms_max: u64) -> FailureReason {
    if let Some(wanted) = state.memory_refused {
        return FailureReason::MemoryLimit {
            bytes_max: state.memory_bytes_max,
            wanted,
        };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return FailureReason::Timeout {
            ms: batch_time_ms_max,
        };
    }
    if let Some(message) = &state.panic_message {
        return FailureReason::Panic(message.clone());
    }
    FailureReason::Trap(error_text(e))
}

/// One instance: a store with its limits, the module's memory and its ABI functions.
pub struct Instance {
    store: Store<HostState>,
    memory: Memory,
    abi_version: TypedFunc<(), i32>,
    alloc: TypedFunc<i32, i32>,
    init: TypedFunc<(i32, i32), i64>,
    process: TypedFunc<(i32, i32), i64>,
    deadline_ticks: u64,
    ticker: Arc<EpochTicker>,
    batch_time_ms_max: u64,
    output_bytes_max: usize,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("module", &self.store.data().module)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Readies a call: the ticker runs until the returned guard is dropped.
    #[must_use]
    fn arm(&mut self) -> Running {
        let running = self.ticker.enter();
        self.store.set_epoch_deadline(self.deadline_ticks);
        let state = self.store.data_mut();
        state.logs_left = LOG_MESSAGES_PER_CALL_MAX;
        state.panic_message = None;
        state.memory_refused = None;
        running
    }

    fn fail(&self, e: &wasmtime::Error) -> FailureReason {
        classify(e, self.store.data(), self.batch_time_ms_max)
    }

    pub fn abi_version(&mut self) -> Result<i32, FailureReason> {
        let _running = self.arm();
        self.abi_version
            .call(&mut self.store, ())
            .map_err(|e| self.fail(&e))
    }

    /// Runs `ketch_init` with the params; `Err(Init)` when the module refuses them.
    pub fn init(&mut self, params: &str) -> Result<(), FailureReason> {
        match self.call(true, params.as_bytes(), 0)? {
            Output::Error(message) => Err(FailureReason::Init(message)),
            _ => Ok(()),
        }
    }

    /// Runs `ketch_process` on an encoded input of `record_count` records.
    pub fn process(&mut self, input: &[u8], record_count: usize) -> Result<Output, FailureReason> {
        self.call(false, input, record_count)
    }

    fn call(
        &mut self,
        init: bool,
        input: &[u8],
        record_count: usize,
    ) -> Result<Output, FailureReason> {
        let _running = self.arm();
        let len = i32::try_from(input.len())
            .map_err(|_| FailureReason::BadOutput("input larger than 2 GiB".into()))?;
        let ptr = self
            .alloc
            .call(&mut self.store, len)
            .map_err(|e| self.fail(&e))? as u32 as usize;
        let memory_bytes = self.memory.data_size(&self.store);
        if !ptr.is_multiple_of(8)
            || ptr
                .checked_add(input.len())
                .is_none_or(|end| end > memory_bytes)
        {
            return Err(FailureReason::BadOutput(format!(
                "`ketch_alloc({len})` returned {ptr:#x}, not an 8-aligned buffer inside memory of {memory_bytes} bytes"
            )));
        }
        self.memory.data_mut(&mut self.store)[ptr..ptr + input.len()].copy_from_slice(input);
        let func = if init {
            self.init.clone()
        } else {
            self.process.clone()
        };
        let packed = func
            .call(&mut self.store, (ptr as i32, len))
            .map_err(|e| self.fail(&e))?;
        let data = self.memory.data(&self.store);
        let (at, n) = abi::output_span(packed, data.len(), self.output_bytes_max)
            .map_err(FailureReason::BadOutput)?;
        abi::decode_output(&data[at..at + n], record_count).map_err(FailureReason::BadOutput)
    }
}
