/**
 * Records as they cross into and out of the native module: packed into one `Buffer` of
 * bytes and one `Float64Array` of numbers per batch (layout in `src/convert.rs`), so a batch
 * of any length costs a few napi calls.
 */

import { InvalidArgumentError } from './errors'

/** What a key, value or header value may be: bytes, or a string sent as UTF-8. */
export type Value = Buffer | Uint8Array | string

/** Headers of a record to send: an object, or `[key, value]` pairs to repeat a key. */
export type HeadersInit =
  | Readonly<Record<string, Value | null | undefined>>
  | ReadonlyArray<readonly [string, Value | null]>

/** A record to send. */
export interface ProducerRecord {
  key?: Value | null
  value?: Value | null
  headers?: HeadersInit
  /** An explicit partition; by default the key's hash chooses (keyless: sticky). */
  partition?: number
  /** Milliseconds since the Unix epoch (or a `Date`); by default the time of sending. */
  timestamp?: number | Date
}

/**
 * A record read from a partition. Offsets and timestamps are `number`s: exact up to
 * 2^53 - 1 (`Number.MAX_SAFE_INTEGER`), which no real log reaches.
 *
 * `key`, `value` and header values are views of the batch the record arrived in (no
 * copy): keeping one alive keeps that batch's bytes alive; `Buffer.from(value)` copies.
 */
export interface ConsumerRecord {
  topic: string
  partition: number
  offset: number
  /** Milliseconds since the Unix epoch. */
  timestamp: number
  key: Buffer | null
  value: Buffer | null
  /** Header values by key (for a repeated key, the last one). */
  headers: Record<string, Buffer | null>
}

/** Where a record was written. */
export interface RecordMetadata {
  topic: string
  partition: number
  /** The record's offset; -1 with `acks: 'none'`, where the broker does not say. */
  offset: number
  /** The record's timestamp as sent (ms since the Unix epoch). */
  timestamp: number
}

/** Packed records, as the native module reads them. */
export interface PackedRecords {
  numbers: Float64Array
  data: Buffer
}

/** Numbers per record before its headers (produce layout). */
const PRODUCE_RECORD_NUMBERS = 5
/** Numbers per record before its headers (consume layout). */
const CONSUME_RECORD_NUMBERS = 7

function valueBytes(value: unknown, what: string): number {
  if (value === null || value === undefined) return 0
  if (typeof value === 'string') return Buffer.byteLength(value, 'utf8')
  if (value instanceof Uint8Array) return value.byteLength
  throw new InvalidArgumentError(
    `${what} must be a Buffer, a Uint8Array, a string or null, not ${describe(value)}`,
    { code: 'invalid_argument' },
  )
}

function describe(value: unknown): string {
  if (Array.isArray(value)) return 'an array'
  return typeof value === 'object' ? `an object (${Object.prototype.toString.call(value)})` : typeof value
}

function headerEntries(headers: HeadersInit | undefined): ReadonlyArray<readonly [string, unknown]> {
  if (headers === undefined || headers === null) return []
  if (Array.isArray(headers)) return headers as ReadonlyArray<readonly [string, unknown]>
  if (typeof headers !== 'object') {
    throw new InvalidArgumentError(`headers must be an object or [key, value] pairs, not ${describe(headers)}`, {
      code: 'invalid_argument',
    })
  }
  return Object.entries(headers)
}

/** Packs records for `NativeProducer.sendPacked`; throws `InvalidArgumentError` on bad input. */
export function packRecords(records: readonly ProducerRecord[]): PackedRecords {
  if (!Array.isArray(records)) {
    throw new InvalidArgumentError(`records must be an array, not ${describe(records)}`, { code: 'invalid_argument' })
  }
  let numberCount = 0
  let byteCount = 0
  const headerLists: Array<ReadonlyArray<readonly [string, unknown]>> = new Array(records.length)
  for (let i = 0; i < records.length; i++) {
    const record = records[i]
    if (record === null || typeof record !== 'object') {
      throw new InvalidArgumentError(`record ${i} must be an object, not ${describe(record)}`, { code: 'invalid_argument' })
    }
    numberCount += PRODUCE_RECORD_NUMBERS
    byteCount += valueBytes(record.key, `record ${i}: key`) + valueBytes(record.value, `record ${i}: value`)
    const headers = headerEntries(record.headers)
    headerLists[i] = headers
    for (const entry of headers) {
      if (!Array.isArray(entry) || typeof entry[0] !== 'string') {
        throw new InvalidArgumentError(`record ${i}: a header key must be a string`, { code: 'invalid_argument' })
      }
      if (entry[1] === undefined) continue
      numberCount += 2
      byteCount += Buffer.byteLength(entry[0], 'utf8') + valueBytes(entry[1], `record ${i}: header ${entry[0]}`)
    }
  }
  const numbers = new Float64Array(numberCount)
  const data = Buffer.allocUnsafe(byteCount)
  let n = 0
  let at = 0
  const write = (value: unknown): number => {
    if (value === null || value === undefined) return -1
    if (typeof value === 'string') {
      const written = data.write(value, at, 'utf8')
      at += written
      return written
    }
    const bytes = value as Uint8Array
    data.set(bytes, at)
    at += bytes.byteLength
    return bytes.byteLength
  }
  for (let i = 0; i < records.length; i++) {
    const record = records[i]!
    numbers[n++] = partitionNumber(record.partition, i)
    numbers[n++] = timestampNumber(record.timestamp, i)
    numbers[n++] = write(record.key)
    numbers[n++] = write(record.value)
    const headers = headerLists[i]!
    let count = 0
    for (const entry of headers) if (entry[1] !== undefined) count++
    numbers[n++] = count
    for (const [key, value] of headers) {
      if (value === undefined) continue
      numbers[n++] = write(key)
      numbers[n++] = write(value)
    }
  }
  return { numbers, data }
}

function partitionNumber(partition: unknown, index: number): number {
  if (partition === undefined || partition === null) return -1
  if (typeof partition === 'number' && Number.isInteger(partition) && partition >= 0 && partition <= 0xffffffff) {
    return partition
  }
  throw new InvalidArgumentError(`record ${index}: partition must be a non-negative integer, not ${String(partition)}`, {
    code: 'invalid_argument',
  })
}

function timestampNumber(timestamp: unknown, index: number): number {
  if (timestamp === undefined || timestamp === null) return Number.NaN
  const ms = timestamp instanceof Date ? timestamp.getTime() : timestamp
  if (typeof ms === 'number' && Number.isSafeInteger(ms)) return ms
  throw new InvalidArgumentError(`record ${index}: timestamp must be integer milliseconds or a Date`, {
    code: 'invalid_argument',
  })
}

/** A chunk of records from `NativeConsumer.recvPacked`. */
export interface PackedChunk {
  topics: string[]
  numbers: Float64Array
  data: Buffer
}

/** The records of a packed chunk, in order. */
export function unpackRecords(chunk: PackedChunk): ConsumerRecord[] {
  const { topics, numbers, data } = chunk
  const records: ConsumerRecord[] = []
  let i = 0
  let at = 0
  const slice = (length: number): Buffer | null => {
    if (length < 0) return null
    const bytes = data.subarray(at, at + length)
    at += length
    return bytes
  }
  while (i < numbers.length) {
    const topic = topics[numbers[i]!]!
    const partition = numbers[i + 1]!
    const offset = numbers[i + 2]!
    const timestamp = numbers[i + 3]!
    const keyLength = numbers[i + 4]!
    const valueLength = numbers[i + 5]!
    const headerCount = numbers[i + 6]!
    i += CONSUME_RECORD_NUMBERS
    const key = slice(keyLength)
    const value = slice(valueLength)
    const headers: Record<string, Buffer | null> = {}
    for (let h = 0; h < headerCount; h++) {
      const keyBytes = numbers[i++]!
      const headerKey = data.toString('utf8', at, at + keyBytes)
      at += keyBytes
      const headerValue = slice(numbers[i++]!)
      if (headerKey === '__proto__') {
        // A plain assignment would set the object's prototype.
        Object.defineProperty(headers, headerKey, { value: headerValue, enumerable: true, writable: true, configurable: true })
      } else {
        headers[headerKey] = headerValue
      }
    }
    records.push({ topic, partition, offset, timestamp, key, value, headers })
  }
  return records
}
