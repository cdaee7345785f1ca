/work/wt/wasm/wasm-filters/target/debug/deps/byte_scan-708b9481ea40934b.d: examples/byte-scan/src/lib.rs

/work/wt/wasm/wasm-filters/target/debug/deps/byte_scan-708b9481ea40934b: examples/byte-scan/src/lib.rs

examples/byte-scan/src/lib.rs:
