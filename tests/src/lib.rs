//! System tests against real `ketch` broker processes, started through the one harness
//! (`ketch-testkit`) on 127.0.0.1 ephemeral ports and stopped by PID, on drop too.
//!
//! The binary is `$KETCH_BIN`, or `ketch` next to the test executable's `deps/` directory
//! (`target/debug/ketch`, built by `cargo build -p ketch-cli` or `cargo build --workspace`).

use std::ops::{Deref, DerefMut};
use std::path::Path;

use anyhow::Context;
pub use ketch_testkit::history;
pub use ketch_testkit::{READY_TIMEOUT as BROKER_READY_TIMEOUT, ketch_bin, now_ms};

pub mod cluster;
pub mod load;
pub mod raw;
pub mod relay;

/// A running broker process: the harness's [`ketch_testkit::KetchProcess`] (its fields and
/// methods through `Deref`), plus client settings that reach it.
#[derive(Debug)]
pub struct BrokerProcess(ketch_testkit::KetchProcess);

impl BrokerProcess {
    /// Starts `ketch serve` on a fresh ephemeral port with `data_dir` and extra flags.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<BrokerProcess> {
        ketch_testkit::KetchProcess::start(data_dir, extra_args).map(BrokerProcess)
    }

    /// Client settings that reach and trust this broker.
    pub fn client_config(&self) -> ketch_client::ClientConfig {
        ketch_client::ClientConfig {
            bootstrap: vec![self.broker_arg()],
            tls: ketch_client::Tls::CaFile(self.ca.clone()),
            ..ketch_client::ClientConfig::default()
        }
    }
}

impl Deref for BrokerProcess {
    type Target = ketch_testkit::KetchProcess;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for BrokerProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A broker and its own temporary data directory; the broker is stopped before the directory
/// goes.
#[derive(Debug)]
pub struct TestBroker {
    pub process: BrokerProcess,
    _data_dir: tempfile::TempDir,
}

impl TestBroker {
    pub fn start(extra_args: &[&str]) -> anyhow::Result<TestBroker> {
        let data_dir = tempfile::tempdir()?;
        let process = BrokerProcess::start(data_dir.path(), extra_args)?;
        Ok(TestBroker {
            process,
            _data_dir: data_dir,
        })
    }

    pub async fn raw(&self) -> anyhow::Result<raw::RawClient> {
        raw::RawClient::connect(self.process.addr, &self.process.ca).await
    }

    pub fn client_config(&self) -> ketch_client::ClientConfig {
        self.process.client_config()
    }

    pub async fn client(&self) -> anyhow::Result<ketch_client::Client> {
        Ok(ketch_client::Client::connect(self.client_config()).await?)
    }

    /// Fails unless a new connection is still served (after `after` happened).
    pub async fn assert_serving(&self, after: &str) -> anyhow::Result<()> {
        raw::assert_serving(self.process.addr, &self.process.ca)
            .await
            .with_context(|| format!("the broker stopped serving after {after}"))
    }
}

/// The repository's root directory.
pub fn repo_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The compiled Wasm example `crate_name`: in `$KETCH_WASM_DIR`, or where
/// `scripts/test-all.sh` builds them (`target/wasm/wasm32-unknown-unknown/release`).
pub fn wasm_example_path(crate_name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::var_os("KETCH_WASM_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/wasm/wasm32-unknown-unknown/release"));
    let path = dir.join(format!("{crate_name}.wasm"));
    anyhow::ensure!(
        path.exists(),
        "{}: build the examples first (scripts/test-all.sh)",
        path.display()
    );
    Ok(path)
}
