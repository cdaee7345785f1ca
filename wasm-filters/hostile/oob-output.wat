;; Hostile: returns an output pointer far outside its memory.
(module
  (memory (export "memory") 1)
  (func (export "ketch_abi_version") (result i32) (i32.const 1))
  (func (export "ketch_alloc") (param i32) (result i32) (i32.const 1024))
  ;; init: a kind-0 output of 8 zero bytes at address 0
  (func (export "ketch_init") (param i32 i32) (result i64) (i64.const 8))
  (func (export "ketch_process") (param i32 i32) (result i64)
    (i64.const 0x7fff000000000100)))
