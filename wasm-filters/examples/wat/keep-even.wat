;; A filter written by hand against ABI.md: keeps records whose offset is even.
;; Shows the whole contract in one page: exports, the input layout, a keep-bitmap output.
(module
  (memory (export "memory") 2)
  ;; Input buffer at 64 KiB (the host writes there), output buffer at 1 KiB.
  (global $input i32 (i32.const 65536))
  (global $output i32 (i32.const 1024))

  (func (export "ketch_abi_version") (result i32) (i32.const 1))

  ;; One fixed buffer; grows memory when a batch needs more.
  (func (export "ketch_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need
      (i32.sub
        (i32.shr_u (i32.add (i32.add (global.get $input) (local.get $len)) (i32.const 65535))
                   (i32.const 16))
        (memory.size)))
    (if (i32.gt_s (local.get $need) (i32.const 0))
      (then (if (i32.eq (memory.grow (local.get $need)) (i32.const -1))
        (then (return (i32.const 0))))))
    (global.get $input))

  ;; Success: a kind-0 output with zero records.
  (func (export "ketch_init") (param i32 i32) (result i64)
    (i32.store (global.get $output) (i32.const 0))
    (i32.store offset=4 (global.get $output) (i32.const 0))
    (i64.or (i64.shl (i64.extend_i32_u (global.get $output)) (i64.const 32)) (i64.const 8)))

  (func (export "ketch_process") (param $ptr i32) (param $len i32) (result i64)
    (local $count i32) (local $i i32) (local $entry i32) (local $byte i32) (local $bitmap i32)
    (local.set $count (i32.load offset=4 (local.get $ptr)))
    (local.set $bitmap (i32.add (global.get $output) (i32.const 8)))
    ;; Clear the bitmap bytes.
    (memory.fill (local.get $bitmap) (i32.const 0)
      (i32.shr_u (i32.add (local.get $count) (i32.const 7)) (i32.const 3)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        ;; entry = ptr + 32 + i * 40; its first field is the i64 offset.
        (local.set $entry
          (i32.add (i32.add (local.get $ptr) (i32.const 32))
                   (i32.mul (local.get $i) (i32.const 40))))
        (if (i64.eqz (i64.and (i64.load (local.get $entry)) (i64.const 1)))
          (then
            (local.set $byte (i32.add (local.get $bitmap) (i32.shr_u (local.get $i) (i32.const 3))))
            (i32.store8 (local.get $byte)
              (i32.or (i32.load8_u (local.get $byte))
                      (i32.shl (i32.const 1) (i32.and (local.get $i) (i32.const 7)))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (global.get $output) (i32.const 0))
    (i32.store offset=4 (global.get $output) (local.get $count))
    (i64.or (i64.shl (i64.extend_i32_u (global.get $output)) (i64.const 32))
            (i64.extend_i32_u
              (i32.add (i32.const 8)
                       (i32.shr_u (i32.add (local.get $count) (i32.const 7)) (i32.const 3)))))))
