/work/wt/wasm/wasm-filters/target/debug/deps/ketch_filter_macros-05de98ce4789018f.d: ketch-filter-macros/src/lib.rs

/work/wt/wasm/wasm-filters/target/debug/deps/libketch_filter_macros-05de98ce4789018f.so: ketch-filter-macros/src/lib.rs

ketch-filter-macros/src/lib.rs:
