/work/wt/wasm/wasm-filters/target/debug/deps/ketch_filter-7324703427348b1c.d: ketch-filter/src/lib.rs ketch-filter/src/abi.rs ketch-filter/src/record.rs

/work/wt/wasm/wasm-filters/target/debug/deps/libketch_filter-7324703427348b1c.rlib: ketch-filter/src/lib.rs ketch-filter/src/abi.rs ketch-filter/src/record.rs

/work/wt/wasm/wasm-filters/target/debug/deps/libketch_filter-7324703427348b1c.rmeta: ketch-filter/src/lib.rs ketch-filter/src/abi.rs ketch-filter/src/record.rs

ketch-filter/src/lib.rs:
ketch-filter/src/abi.rs:
ketch-filter/src/record.rs:
