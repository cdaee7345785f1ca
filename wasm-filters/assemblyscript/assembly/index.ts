// Ketch filters in AssemblyScript: the ABI of ../ABI.md (version 1).
//
//   import { Record, filter } from "../assembly";
//   filter((r: Record): bool => r.valueString().includes("ERROR"));
//   export { ketch_abi_version, ketch_alloc, ketch_init, ketch_process } from "../assembly";

const HEADER_BYTES: usize = 32;
const ENTRY_BYTES: usize = 40;
const LEVEL_PANIC: i32 = 4;

// @ts-ignore: decorator
@external("ketch", "log")
declare function hostLog(level: i32, ptr: usize, len: usize): void;

/** Logs through the host (rate-limited). Levels: 0 debug, 1 info, 2 warn, 3 error. */
export function log(level: i32, message: string): void {
  const bytes = String.UTF8.encode(message);
  hostLog(level, changetype<usize>(bytes), bytes.byteLength);
}

/** Aborts (failed assertions, out-of-range accesses) become the error's reason. */
export function ketchAbort(message: string | null, file: string | null, line: u32, column: u32): void {
  let text = message !== null ? message : "abort";
  text += " at " + (file !== null ? file : "?") + ":" + line.toString() + ":" + column.toString();
  const bytes = String.UTF8.encode(text);
  hostLog(LEVEL_PANIC, changetype<usize>(bytes), bytes.byteLength);
  unreachable();
}

/** One input record; its accessors read the host's input buffer in place. */
export class Record {
  base: usize = 0;
  entry: usize = 0;

  offset(): i64 { return load<i64>(this.entry); }
  timestamp(): i64 { return load<i64>(this.entry + 8); }
  hasKey(): bool { return load<i32>(this.entry + 20) >= 0; }
  keyPtr(): usize { return this.base + <usize>load<u32>(this.entry + 16); }
  keyLen(): i32 { return load<i32>(this.entry + 20); }
  valuePtr(): usize { return this.base + <usize>load<u32>(this.entry + 24); }
  valueLen(): i32 { return load<i32>(this.entry + 28); }
  keyString(): string | null {
    return this.hasKey() ? String.UTF8.decodeUnsafe(this.keyPtr(), <usize>this.keyLen()) : null;
  }
  valueString(): string { return String.UTF8.decodeUnsafe(this.valuePtr(), <usize>this.valueLen()); }
  /** Whether the value contains `needle` (bytes of its UTF-8), without copying the value. */
  valueContains(needle: string): bool {
    const n = String.UTF8.encode(needle);
    const np = changetype<usize>(n);
    const nl = <usize>n.byteLength;
    const vp = this.valuePtr();
    const vl = <usize>this.valueLen();
    if (nl == 0) return true;
    if (nl > vl) return false;
    for (let i: usize = 0; i <= vl - nl; i++) {
      if (memory.compare(vp + i, np, nl) == 0) return true;
    }
    return false;
  }
}

let keepFn: ((r: Record) => bool) | null = null;
let initFn: ((params: string) => string | null) | null = null;
let paramsText: string = "";

/** Makes this module a filter: `keep` returns whether a record stays. */
export function filter(keep: (r: Record) => bool): void { keepFn = keep; }

/** Runs once per instance with the params; a returned string refuses them with that message. */
export function onInit(init: (params: string) => string | null): void { initFn = init; }

/** The JSON text given at attach time. */
export function params(): string { return paramsText; }

let input: usize = 0;
let inputCap: usize = 0;
let output: usize = 0;
let outputCap: usize = 0;

function outputOf(bytes: usize): usize {
  if (bytes > outputCap) {
    if (output) heap.free(output);
    output = heap.alloc(bytes);
    outputCap = bytes;
  }
  return output;
}

function packed(ptr: usize, len: usize): i64 {
  return (<i64>ptr << 32) | <i64>len;
}

function errorOutput(message: string): i64 {
  const bytes = String.UTF8.encode(message);
  const len = <usize>bytes.byteLength;
  const out = outputOf(8 + len);
  store<u32>(out, 2);
  store<u32>(out + 4, <u32>len);
  memory.copy(out + 8, changetype<usize>(bytes), len);
  return packed(out, 8 + len);
}

export function ketch_abi_version(): i32 { return 1; }

export function ketch_alloc(len: i32): usize {
  if (<usize>len > inputCap) {
    if (input) heap.free(input);
    input = heap.alloc(<usize>len); // 16-aligned
    inputCap = <usize>len;
  }
  return input;
}

export function ketch_init(ptr: usize, len: i32): i64 {
  paramsText = String.UTF8.decodeUnsafe(ptr, <usize>len);
  if (initFn) {
    const refusal = initFn!(paramsText);
    if (refusal !== null) return errorOutput(refusal);
  }
  const out = outputOf(8);
  store<u32>(out, 0);
  store<u32>(out + 4, 0);
  return packed(out, 8);
}

const record = new Record();

export function ketch_process(ptr: usize, len: i32): i64 {
  const count = <usize>load<u32>(ptr + 4);
  const bitmapBytes = (count + 7) >> 3;
  const out = outputOf(8 + bitmapBytes);
  store<u32>(out, 0);
  store<u32>(out + 4, <u32>count);
  memory.fill(out + 8, 0, bitmapBytes);
  if (!keepFn) return errorOutput("no filter registered: call filter(fn) at the top level");
  const keep = keepFn!;
  record.base = ptr;
  for (let i: usize = 0; i < count; i++) {
    record.entry = ptr + HEADER_BYTES + i * ENTRY_BYTES;
    if (keep(record)) {
      const at = out + 8 + (i >> 3);
      store<u8>(at, load<u8>(at) | <u8>(1 << <u8>(i & 7)));
    }
  }
  return packed(out, 8 + bitmapBytes);
}
