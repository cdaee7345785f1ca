/**
 * Ketch for Node.js: a thin layer over the Rust client core (`ketch-client`), with Promises,
 * `for await` consumers and typed errors.
 *
 * ```ts
 * import { Client } from 'ketch'
 * const client = await Client.connect({ bootstrap: '127.0.0.1:9192', caCert: 'ketch-data/ca.pem' })
 * const producer = client.producer({ acks: 'all', lingerMs: 5 })
 * await producer.send('orders', { key: 'user-1', value: 'hello', headers: { source: 'web' } })
 * for await (const record of client.consumer({ topics: ['orders'], group: 'billing', start: 'earliest' })) { ... }
 * ```
 *
 * All I/O runs on the core's runtime threads; the event loop only converts values. Nothing
 * here holds the process open: once no Promise of this SDK is pending, Node exits, whether
 * or not the client was closed.
 */

import { EventEmitter } from 'node:events'

import * as native from '../native/index.js'
import {
  ClosedError,
  InvalidArgumentError,
  KetchError,
  call,
  callSync,
  fromNative,
} from './errors'
import {
  fromNativeAcl,
  fromNativeToken,
  fromNativeTokenDescription,
  rate,
  toNativeAcl,
  type Acl,
  type AclBinding,
  type NewToken,
  type Quota,
  type TokenInfo,
} from './security'
import {
  packRecords,
  unpackRecords,
  type ConsumerRecord,
  type ProducerRecord,
  type RecordMetadata,
} from './records'

export {
  AuthenticationFailedError,
  BrokerUnavailableError,
  ClosedError,
  FilterError,
  InvalidArgumentError,
  KetchError,
  NotAuthorizedError,
  OffsetOutOfRangeError,
  RecordTooLargeError,
  TimeoutError,
  TopicAlreadyExistsError,
  TopicNotFoundError,
  TransformError,
  type KetchErrorOptions,
} from './errors'
export { aclToString } from './security'
export type {
  Acl,
  AclBinding,
  AclOperation,
  AclResource,
  NewToken,
  Quota,
  TokenInfo,
} from './security'
export type {
  ConsumerRecord,
  HeadersInit,
  ProducerRecord,
  RecordMetadata,
  Value,
} from './records'

/** Where `ketch serve` with no arguments listens. */
export const BOOTSTRAP_DEFAULT = '127.0.0.1:9192'
/** Where `ketch serve` with no arguments writes its development CA. */
export const CA_CERT_DEFAULT = 'ketch-data/ca.pem'

/** How to reach and trust the brokers. */
export interface ClientOptions {
  /** `host:port` of one or more brokers; default `$KETCH_BROKER`, else `127.0.0.1:9192`. */
  bootstrap?: string | string[]
  /** PEM file of the CA; default `$KETCH_CA_CERT`, else `./ketch-data/ca.pem`. */
  caCert?: string
  /** The CA certificate(s) as PEM text, instead of a file. */
  caPem?: string | Buffer
  /** Accept any certificate: anyone on the path can impersonate the broker. Tests only. */
  dangerAcceptInvalidCerts?: boolean
  /** TLS server name the broker's certificate is checked against (default `localhost`). */
  serverName?: string
  clientId?: string
  /** Time limit of one request (default 30 s). */
  requestTimeoutMs?: number
  /** Time limit of one QUIC handshake (default 10 s). */
  connectTimeoutMs?: number
  /** Bearer token for brokers that authenticate clients by token. */
  token?: string
  /** PEM file of a client certificate chain, leaf first (mutual TLS); needs `clientKey`. */
  clientCert?: string
  /** PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1). */
  clientKey?: string
}

/** Producer settings; each defaults to the Rust core's default. */
export interface ProducerOptions {
  /** Durability each write waits for (default `'all'`). */
  acks?: 'all' | 'leader' | 'none'
  /** How long a batch that is not full waits for more records (default 5 ms). */
  lingerMs?: number
  /** Largest batch in bytes (default 1 MiB, lowered to the brokers' own cap). */
  batchBytesMax?: number
  /** Bytes buffered and in flight; sends wait while it is full (default 32 MiB). */
  bufferBytesMax?: number
  /** Duplicate-free retries (default on, except with `acks: 'none'`). */
  idempotent?: boolean
  /** Time from send until a record is reported failed, retries included (default 120 s). */
  deliveryTimeoutMs?: number
  requestTimeoutMs?: number
  inFlightRequestsMax?: number
  partitionInFlightBatchesMax?: number
  /** Where keyless records go: `'sticky'` (default) or `'round-robin'`. */
  nullKeyPartitioning?: 'sticky' | 'round-robin'
}

/** A partition of a topic. */
export interface TopicPartition {
  topic: string
  partition: number
}

/** Consumer settings: `topics` (with `group`) for a group member, or explicit `partitions`. */
export interface ConsumerOptions {
  topics?: string[]
  partitions?: TopicPartition[]
  /** Consumer group: needed with `topics` and to commit. */
  group?: string
  /** Where to start without a committed offset (default `'latest'`). */
  start?: 'earliest' | 'latest' | 'error'
  /**
   * Commit positions every `autoCommitIntervalMs`, before partitions are revoked, and on
   * close (default true). Records read ahead of the loop (at most `maxBatchRecords`) count
   * as consumed for the periodic commit; call `commit()` yourself for at-least-once.
   */
  autoCommit?: boolean
  autoCommitIntervalMs?: number
  sessionTimeoutMs?: number
  /** Cap of one push of a partition's records (default 1 MiB). */
  partitionFetchBytesMax?: number
  /**
   * Chunks the core buffers ahead of the loop (default 64): with `partitionFetchBytesMax`
   * this bounds the consumer's memory; when they are taken, the broker is held back.
   */
  prefetchChunksMax?: number
  /** Records taken from the core's queue per napi call (default 512). */
  maxBatchRecords?: number
  /**
   * How long the core waits for the `'assign'` / `'revoke'` handlers of one rebalance before
   * it goes on without them (default 30 000 ms): a revoked partition is released to the group
   * once its handlers finished or this passed.
   */
  assignmentListenerTimeoutMs?: number
  /**
   * A Wasm filter uploaded with `client.uploadFilter`: the broker runs it on the partitions'
   * records and sends only what it keeps, at their own offsets (commits and seeks work as
   * without). A filter that is unknown or fails rejects the read with a `FilterError`.
   */
  filter?: string
  /** Parameters for the filter's `init`: serialised as JSON (a string is sent as it is). */
  filterParams?: Record<string, unknown> | string
  /** A stored version of the filter (default: the latest when each partition's stream opens). */
  filterVersion?: number
}

/** A stored version of a Wasm filter module. */
export interface FilterVersion {
  name: string
  /** 1 for the first upload, one more for each upload of different bytes. */
  version: number
  description: string
  moduleBytes: number
  /** SHA-256 of the module, lower-case hex. */
  digest: string
}

/** A filter's stored versions (oldest first) and what uses it. */
export interface FilterDescription {
  name: string
  versions: FilterVersion[]
  /** Subscriptions and topics the filter is attached to: a delete without `force` is refused meanwhile. */
  inUseBy: string[]
}

/** What a record a produce-chain module rejects does: the send fails with a `FilterError`, the record is dropped, or it goes to a dead-letter topic. */
export type OnRecordError = 'fail' | 'skip' | `dead-letter:${string}`

/** A topic's produce chain as the broker holds it. */
export interface TopicFilters {
  topic: string
  /** In the order they run, each pinned at a version; empty without a chain. */
  filters: Array<{ name: string; version: number }>
  /** The JSON text the modules got at init. */
  params: string
  /** `''` without a chain. */
  onError: OnRecordError | ''
}

/** A topic-to-topic transform to create. */
export interface NewTransform {
  /** The deployed filter (pinned at its latest version now). */
  filter: string
  /** The topic read. */
  input: string
  /** The topics written (at least one); records the module routes nowhere go to the first. */
  outputs: string[]
  /** Where reading starts (default `'beginning'`). */
  start?: 'beginning' | 'end' | number
  /** Handed to the module's `init`: an object (sent as JSON) or JSON text. */
  params?: Record<string, unknown> | string
}

/** A transform's state. */
export interface TransformStatus {
  name: string
  filter: string
  filterVersion: number
  input: string
  outputs: string[]
  params: string
  status: 'running' | 'paused' | 'failed'
  /** Input records transformed (committed). */
  recordsIn: number
  /** Records written to the outputs. */
  recordsOut: number
  /** Input records not yet transformed. */
  lag: number
  /** The last error; `''` when none. */
  lastError: string
}

function jsonParams(params: Record<string, unknown> | string | undefined): string | undefined {
  return params === undefined || typeof params === 'string' ? params : JSON.stringify(params)
}

/** Options of `createTopic`. */
export interface CreateTopicOptions {
  partitions?: number
  replicationFactor?: number
  /** Topic configuration, e.g. `{ 'retention.ms': '86400000' }`. */
  configs?: Record<string, string>
}

/** A topic in `listTopics`. */
export interface TopicSummary {
  name: string
  partitions: number
  replicationFactor: number
}

/** Where `seek` moves a position. */
export type SeekTarget = number | 'beginning' | 'end' | { timestamp: number | Date }

function closedError(what: string): ClosedError {
  return new ClosedError(`${what} is closed`, { code: 'closed' })
}

function nonNegativeInteger(value: unknown, name: string, max = 0xffffffff): number | undefined {
  if (value === undefined || value === null) return undefined
  if (typeof value === 'number' && Number.isInteger(value) && value >= 0 && value <= max) return value
  throw new InvalidArgumentError(`${name} must be a non-negative integer, not ${String(value)}`, {
    code: 'invalid_argument',
  })
}

/** A connection to a Ketch cluster: topics, producers, consumers. */
export class Client {
  readonly #native: native.NativeClient
  readonly #handles = new Set<{ close(): Promise<void> }>()
  #closed = false

  private constructor(client: native.NativeClient) {
    this.#native = client
  }

  /**
   * Connects to the first bootstrap broker that answers and loads the cluster metadata.
   * Defaults: `$KETCH_BROKER` (else `127.0.0.1:9192`), `$KETCH_CA_CERT` (else
   * `./ketch-data/ca.pem`).
   */
  static async connect(options: ClientOptions = {}): Promise<Client> {
    const bootstrapOption = options.bootstrap ?? process.env.KETCH_BROKER ?? BOOTSTRAP_DEFAULT
    const bootstrap = (Array.isArray(bootstrapOption) ? bootstrapOption : bootstrapOption.split(','))
      .map((address) => address.trim())
      .filter((address) => address.length > 0)
    const caPem = options.caPem === undefined ? undefined : options.caPem.toString()
    const caCert = caPem === undefined && options.dangerAcceptInvalidCerts !== true
      ? options.caCert ?? process.env.KETCH_CA_CERT ?? CA_CERT_DEFAULT
      : options.caCert
    const client = await call(() =>
      native.connect({
        bootstrap,
        caCert,
        caPem,
        dangerAcceptInvalidCerts: options.dangerAcceptInvalidCerts,
        serverName: options.serverName,
        clientId: options.clientId,
        requestTimeoutMs: nonNegativeInteger(options.requestTimeoutMs, 'requestTimeoutMs'),
        connectTimeoutMs: nonNegativeInteger(options.connectTimeoutMs, 'connectTimeoutMs'),
        token: options.token,
        clientCert: options.clientCert,
        clientKey: options.clientKey,
      }),
    )
    return new Client(client)
  }

  #check(): void {
    if (this.#closed) throw closedError('the client')
  }

  /** Creates a topic (one partition unless told). */
  async createTopic(name: string, options: CreateTopicOptions = {}): Promise<void> {
    this.#check()
    const partitions = nonNegativeInteger(options.partitions, 'partitions') ?? 1
    const replicationFactor = nonNegativeInteger(options.replicationFactor, 'replicationFactor', 0xffff)
    await call(() => this.#native.createTopic(name, partitions, replicationFactor, options.configs))
  }

  /** Deletes a topic and its records. */
  async deleteTopic(name: string): Promise<void> {
    this.#check()
    await call(() => this.#native.deleteTopic(name))
  }

  /** Every topic. */
  async listTopics(): Promise<TopicSummary[]> {
    this.#check()
    return await call(() => this.#native.listTopics())
  }

  /** A topic's partitions (leaders, log start offsets, high watermarks) and configuration. */
  async describeTopic(name: string): Promise<native.NativeTopicDescription> {
    this.#check()
    return await call(() => this.#native.describeTopic(name))
  }

  /** Every consumer group. */
  async listGroups(): Promise<native.NativeGroupSummary[]> {
    this.#check()
    return await call(() => this.#native.listGroups())
  }

  /** A group's committed offsets (the next offset to read, per partition). */
  async committedOffsets(group: string): Promise<Array<TopicPartition & { offset: number }>> {
    this.#check()
    return await call(() => this.#native.committedOffsets(group))
  }

  /** A producer on this client's connections. */
  producer(options: ProducerOptions = {}): Producer {
    this.#check()
    const producer = new Producer(this.#native, options, this.#handles)
    this.#handles.add(producer)
    return producer
  }

  /** A consumer: a group member of `topics`, or a reader of explicit `partitions`. */
  consumer(options: ConsumerOptions): Consumer {
    this.#check()
    const consumer = new Consumer(this.#native, options, this.#handles)
    this.#handles.add(consumer)
    return consumer
  }

  /**
   * Uploads a Wasm module (the bytes of a `.wasm` file) as filter `name`. The broker
   * validates and compiles it; a new version is numbered unless the bytes equal the latest
   * version's. A module that breaks the ABI or a limit rejects with a `FilterError`.
   */
  async uploadFilter(name: string, module: Uint8Array, options: { description?: string } = {}): Promise<FilterVersion> {
    this.#check()
    const bytes = Buffer.isBuffer(module) ? module : Buffer.from(module.buffer, module.byteOffset, module.byteLength)
    return await call(() => this.#native.uploadFilter(name, bytes, options.description))
  }

  /** Every filter, with its latest version. */
  async listFilters(): Promise<FilterVersion[]> {
    this.#check()
    return await call(() => this.#native.listFilters())
  }

  /** Every stored version of filter `name` and what uses it. */
  async describeFilter(name: string): Promise<FilterDescription> {
    this.#check()
    return await call(() => this.#native.describeFilter(name))
  }

  /** Deletes every version of a filter; while it is in use this rejects (`filter_in_use`) unless `force`. */
  async deleteFilter(name: string, options: { force?: boolean } = {}): Promise<void> {
    this.#check()
    await call(() => this.#native.deleteFilter(name, options.force))
  }

  // Produce chains and topic-to-topic transforms (modules deployed with `uploadFilter`).

  /**
   * Sets `topic`'s produce chain: every batch produced to it runs through `filters` in
   * order (each pinned at its latest version, initialised with `params` now) before the
   * broker appends it. `onError`: `'fail'` (the send rejects with a `FilterError`, the
   * default), `'skip'` or `'dead-letter:TOPIC'`. An empty list clears the chain. A module that
   * refuses its params rejects, and the previous chain stays.
   */
  async setTopicFilters(
    topic: string,
    filters: readonly string[],
    options: { params?: Record<string, unknown> | string; onError?: OnRecordError } = {},
  ): Promise<Array<{ name: string; version: number }>> {
    this.#check()
    return await call(() => this.#native.setTopicFilters(topic, [...filters], jsonParams(options.params), options.onError))
  }

  /** Removes `topic`'s produce chain. */
  async clearTopicFilters(topic: string): Promise<void> {
    this.#check()
    await call(() => this.#native.clearTopicFilters(topic))
  }

  /** `topic`'s produce chain. */
  async topicFilters(topic: string): Promise<TopicFilters> {
    this.#check()
    return (await call(() => this.#native.topicFilters(topic))) as TopicFilters
  }

  /**
   * Creates and starts a topic-to-topic transform `name`: the broker reads `input` from
   * `start`, runs the filter on each batch and writes what it keeps or emits to `outputs`,
   * exactly once across broker crashes. Rejects with a `TransformError` if `name` exists.
   */
  async createTransform(name: string, transform: NewTransform): Promise<TransformStatus> {
    this.#check()
    const start = transform.start ?? 'beginning'
    if (typeof start === 'number' && !(Number.isSafeInteger(start) && start >= 0)) {
      throw new InvalidArgumentError(`start must be 'beginning', 'end' or an offset >= 0, not ${start}`, { code: 'invalid_argument' })
    }
    const native = {
      name,
      filter: transform.filter,
      input: transform.input,
      outputs: [...transform.outputs],
      start: String(start),
      params: jsonParams(transform.params),
    }
    return (await call(() => this.#native.createTransform(native))) as TransformStatus
  }

  /** Every transform, with its state. */
  async listTransforms(): Promise<TransformStatus[]> {
    this.#check()
    return (await call(() => this.#native.listTransforms())) as TransformStatus[]
  }

  /** One transform's state; rejects with a `TransformError` if there is none. */
  async describeTransform(name: string): Promise<TransformStatus> {
    this.#check()
    return (await call(() => this.#native.describeTransform(name))) as TransformStatus
  }

  /** Stops a transform where it is (its position is kept). */
  async pauseTransform(name: string): Promise<void> {
    this.#check()
    await call(() => this.#native.pauseTransform(name))
  }

  /** Starts a paused or failed transform again from its committed position. */
  async resumeTransform(name: string): Promise<void> {
    this.#check()
    await call(() => this.#native.resumeTransform(name))
  }

  /** Stops and removes a transform (its outputs stay). */
  async deleteTransform(name: string): Promise<void> {
    this.#check()
    await call(() => this.#native.deleteTransform(name))
  }

  // Security administration: the broker's `admin` principal (the token `ketch serve --auth
  // required` writes to DATA_DIR/admin.token) or any principal allowed `alter` on the cluster.

  /**
   * Makes an API token for `principal`, valid for `expiresInMs` (or forever). The secret is
   * in `.token`, shown this once; the broker keeps only its hash.
   */
  async createToken(principal: string, options: { expiresInMs?: number } = {}): Promise<NewToken> {
    this.#check()
    const expiresInMs = options.expiresInMs
    if (expiresInMs !== undefined && !(Number.isSafeInteger(expiresInMs) && expiresInMs > 0)) {
      throw new InvalidArgumentError(`expiresInMs must be a positive integer, not ${String(expiresInMs)}`, {
        code: 'invalid_argument',
      })
    }
    return fromNativeToken(await call(() => this.#native.createToken(principal, expiresInMs)))
  }

  /** Every token the broker knows (revoked and expired ones too), without secrets. */
  async listTokens(): Promise<TokenInfo[]> {
    this.#check()
    return (await call(() => this.#native.listTokens())).map(fromNativeTokenDescription)
  }

  /**
   * Revokes a token, named by itself or by its id; resolves with its id. Clients using it
   * fail their next request with an `AuthenticationFailedError`.
   */
  async revokeToken(tokenOrId: string): Promise<string> {
    this.#check()
    return await call(() => this.#native.revokeToken(tokenOrId))
  }

  /** Adds access rules; resolves with how many were new. */
  async addAcls(acls: Acl | readonly Acl[]): Promise<number> {
    this.#check()
    const rules = (Array.isArray(acls) ? acls : [acls as Acl]).map(toNativeAcl)
    return await call(() => this.#native.addAcls(rules))
  }

  /** Removes access rules; resolves with how many were there. */
  async removeAcls(acls: Acl | readonly Acl[]): Promise<number> {
    this.#check()
    const rules = (Array.isArray(acls) ? acls : [acls as Acl]).map(toNativeAcl)
    return await call(() => this.#native.removeAcls(rules))
  }

  /** Every access rule. */
  async listAcls(): Promise<AclBinding[]> {
    this.#check()
    return (await call(() => this.#native.listAcls())).map(fromNativeAcl)
  }

  /**
   * Sets a principal's byte rates (absent or 0: no limit; both 0 removes its quota). A
   * principal over its rate is slowed down, not refused.
   */
  async setQuota(principal: string, rates: { produceBytesPerS?: number; fetchBytesPerS?: number } = {}): Promise<void> {
    this.#check()
    const quota = {
      principal,
      produceBytesPerS: rate(rates.produceBytesPerS, 'produceBytesPerS'),
      fetchBytesPerS: rate(rates.fetchBytesPerS, 'fetchBytesPerS'),
    }
    await call(() => this.#native.setQuota(quota))
  }

  /** Every quota. */
  async listQuotas(): Promise<Quota[]> {
    this.#check()
    return await call(() => this.#native.listQuotas())
  }

  /**
   * Closes the producers (delivering what they buffered) and consumers (committing with
   * auto-commit) made from this client, then every connection. Idempotent.
   */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    const results = await Promise.allSettled([...this.#handles].map((handle) => handle.close()))
    this.#native.close()
    const failed = results.find((result): result is PromiseRejectedResult => result.status === 'rejected')
    if (failed !== undefined) throw fromNative(failed.reason)
  }
}

interface PendingSend {
  record: ProducerRecord
  resolve: (metadata: RecordMetadata) => void
  reject: (error: KetchError) => void
}

/**
 * Sends records: batched per partition by the core (`lingerMs`, `batchBytesMax`), retried
 * without duplicates. `send`s made in the same tick cross into the native module together.
 */
export class Producer {
  readonly #ready: Promise<native.NativeProducer>
  readonly #handles: Set<{ close(): Promise<void> }>
  /** Sends of this tick, per topic, not yet handed to the native module. */
  #queued = new Map<string, PendingSend[]>()
  #flushScheduled = false
  /** Native calls not yet settled (flush waits for them). */
  readonly #inFlight = new Set<Promise<unknown>>()
  #closed = false
  #closing: Promise<void> | undefined

  /** @internal Use `client.producer()`. */
  constructor(client: native.NativeClient, options: ProducerOptions, handles: Set<{ close(): Promise<void> }>) {
    this.#handles = handles
    const config = {
      acks: options.acks,
      lingerMs: nonNegativeInteger(options.lingerMs, 'lingerMs'),
      batchBytesMax: nonNegativeInteger(options.batchBytesMax, 'batchBytesMax'),
      bufferBytesMax: nonNegativeInteger(options.bufferBytesMax, 'bufferBytesMax'),
      inFlightRequestsMax: nonNegativeInteger(options.inFlightRequestsMax, 'inFlightRequestsMax'),
      partitionInFlightBatchesMax: nonNegativeInteger(options.partitionInFlightBatchesMax, 'partitionInFlightBatchesMax'),
      idempotent: options.idempotent,
      deliveryTimeoutMs: nonNegativeInteger(options.deliveryTimeoutMs, 'deliveryTimeoutMs'),
      requestTimeoutMs: nonNegativeInteger(options.requestTimeoutMs, 'requestTimeoutMs'),
      nullKeyPartitioning: options.nullKeyPartitioning,
    }
    this.#ready = call(() => client.producer(config))
    // A producer that fails to start reports it from its first call, not as an unhandled
    // rejection.
    this.#ready.catch(() => {})
  }

  /** Sends one record; resolves with where it was written. */
  send(topic: string, record: ProducerRecord): Promise<RecordMetadata> {
    if (this.#closed) return Promise.reject(closedError('the producer'))
    // Check the record now, so that a bad one fails alone and at its own call.
    try {
      packRecords([record])
    } catch (error) {
      return Promise.reject(error)
    }
    return new Promise<RecordMetadata>((resolve, reject) => {
      let queue = this.#queued.get(topic)
      if (queue === undefined) {
        queue = []
        this.#queued.set(topic, queue)
      }
      queue.push({ record, resolve, reject })
      if (!this.#flushScheduled) {
        this.#flushScheduled = true
        queueMicrotask(() => this.#sendQueued())
      }
    })
  }

  #sendQueued(): void {
    this.#flushScheduled = false
    const queued = this.#queued
    this.#queued = new Map()
    for (const [topic, sends] of queued) {
      const sent = this.#sendPacked(topic, sends.map((s) => s.record)).then(
        (results) => {
          results.forEach((result, i) => {
            if (result instanceof KetchError) sends[i]!.reject(result)
            else sends[i]!.resolve(result)
          })
        },
        (error: unknown) => {
          const failure = fromNative(error)
          for (const s of sends) s.reject(failure)
        },
      )
      this.#track(sent)
    }
  }

  #track(promise: Promise<unknown>): void {
    const settled = promise.then(
      () => {},
      () => {},
    )
    this.#inFlight.add(settled)
    void settled.then(() => this.#inFlight.delete(settled))
  }

  async #sendPacked(topic: string, records: readonly ProducerRecord[]): Promise<Array<RecordMetadata | KetchError>> {
    const { numbers, data } = packRecords(records)
    const producer = await this.#ready
    const report = await call(() => producer.sendPacked(topic, numbers, data))
    const results: Array<RecordMetadata | KetchError> = new Array(records.length)
    for (let i = 0; i < records.length; i++) {
      results[i] = {
        topic,
        partition: report.partitions[i]!,
        offset: report.offsets[i]!,
        timestamp: report.timestamps[i]!,
      }
    }
    report.errorIndexes.forEach((index, i) => {
      results[index] = fromNative(new Error(report.errorMessages[i]))
    })
    return results
  }

  /**
   * Sends many records to one topic in one call across napi; resolves with where each was
   * written, in order. If any record fails, rejects with the first failure; its `failures`
   * property lists every failed index with its error.
   */
  async sendMany(topic: string, records: readonly ProducerRecord[]): Promise<RecordMetadata[]> {
    if (this.#closed) throw closedError('the producer')
    const sending = this.#sendPacked(topic, records)
    this.#track(sending)
    const results = await sending
    const failures: Array<{ index: number; error: KetchError }> = []
    results.forEach((result, index) => {
      if (result instanceof KetchError) failures.push({ index, error: result })
    })
    if (failures.length > 0) {
      const first = failures[0]!.error
      Object.defineProperty(first, 'failures', { value: failures, enumerable: false })
      throw first
    }
    return results as RecordMetadata[]
  }

  /** Sends everything buffered now; resolves when all of it is delivered or failed. */
  async flush(): Promise<void> {
    if (this.#flushScheduled) this.#sendQueued()
    await Promise.all(this.#inFlight)
    const producer = await this.#ready
    await call(() => producer.flush())
  }

  /** Delivers what is buffered, then stops. Later sends fail with `ClosedError`. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#flushScheduled) this.#sendQueued()
      this.#closed = true
      this.#handles.delete(this)
      await Promise.all(this.#inFlight)
      let producer: native.NativeProducer
      try {
        producer = await this.#ready
      } catch {
        return // never started: nothing to close
      }
      await call(() => producer.close())
    })()
    return this.#closing
  }
}

function partitionKey(topic: string, partition: number): string {
  return `${partition}\u0000${topic}`
}

/**
 * Reads records: `for await (const record of consumer)`. The loop pulls from the core's
 * bounded queue, so a slow loop body slows the broker's push streams, not memory.
 *
 * Events: `'assign'`, `'revoke'` and `'lost'` with the partitions (handlers may be async;
 * the next event waits for them), `'error'` for a handler that threw.
 */
export class Consumer extends EventEmitter {
  readonly #native: native.NativeConsumer
  readonly #handles: Set<{ close(): Promise<void> }>
  readonly #maxBatchRecords: number
  readonly #autoCommit: boolean
  /** Records taken from the core but not yet handed to the loop. */
  #buffer: ConsumerRecord[] = []
  #next = 0
  /** Records of `#buffer` below this index are accounted in `#consumed` (see `#foldConsumed`). */
  #folded = 0
  /** The offset after the last record handed out, per partition: what `commit` commits. */
  readonly #consumed = new Map<string, TopicPartition & { offset: number }>()
  #receiving: Promise<ConsumerRecord | undefined> | undefined
  #closed = false
  #closing: Promise<void> | undefined
  /** Set once the core's close is done; until then a revoke handler run by `close()` commits. */
  #released = false
  /** Partitions revoked (without auto-commit) or lost: a chunk received as they went is not handed out. */
  readonly #gone = new Set<string>()

  /** @internal Use `client.consumer()`. */
  constructor(client: native.NativeClient, options: ConsumerOptions, handles: Set<{ close(): Promise<void> }>) {
    super()
    this.#handles = handles
    this.#autoCommit = options.autoCommit ?? true
    this.#maxBatchRecords = nonNegativeInteger(options.maxBatchRecords, 'maxBatchRecords') ?? 512
    if (this.#maxBatchRecords === 0) {
      throw new InvalidArgumentError('maxBatchRecords must be at least 1', { code: 'invalid_argument' })
    }
    // A group member's revoke handlers run as the core's assignment listener: the core waits
    // for them before it releases the partitions, so a commit there is the last word.
    const onRebalance =
      options.topics !== undefined
        ? ([kind, partitions]: [string, native.NativeTopicPartition[]]) => this.#rebalanced(kind, partitions)
        : undefined
    this.#native = callSync(() =>
      client.consumer(
        {
          topics: options.topics,
          partitions: options.partitions,
          group: options.group,
          start: options.start,
          autoCommit: options.autoCommit,
          autoCommitIntervalMs: nonNegativeInteger(options.autoCommitIntervalMs, 'autoCommitIntervalMs'),
          sessionTimeoutMs: nonNegativeInteger(options.sessionTimeoutMs, 'sessionTimeoutMs'),
          partitionFetchBytesMax: nonNegativeInteger(options.partitionFetchBytesMax, 'partitionFetchBytesMax'),
          prefetchChunksMax: nonNegativeInteger(options.prefetchChunksMax, 'prefetchChunksMax'),
          assignmentListenerTimeoutMs: nonNegativeInteger(
            options.assignmentListenerTimeoutMs,
            'assignmentListenerTimeoutMs',
          ),
          filter: options.filter,
          filterParams: typeof options.filterParams === 'string' || options.filterParams === undefined
            ? options.filterParams
            : JSON.stringify(options.filterParams),
          filterVersion: nonNegativeInteger(options.filterVersion, 'filterVersion'),
        },
        onRebalance,
      ),
    )
  }

  /**
   * Runs the handlers of a rebalance event; the core waits for the returned Promise. On
   * `'revoke'` the core already hands out no more records of the partitions and releases them
   * only after this settles: what the loop was given is still in `commit()` for the handlers.
   */
  async #rebalanced(kind: string, partitions: TopicPartition[]): Promise<void> {
    const gone = new Set(partitions.map((p) => partitionKey(p.topic, p.partition)))
    if (kind === 'revoke' || kind === 'lost') {
      // With auto-commit the core commits past the records read ahead after the handlers:
      // the next owner starts after them, so the loop still gets them. Otherwise (or when the
      // partitions were lost without a commit) the next owner reads them, so the loop must not.
      if (kind === 'lost' || !this.#autoCommit) {
        for (const key of gone) this.#gone.add(key)
        this.#dropBuffered((record) => gone.has(partitionKey(record.topic, record.partition)))
      }
    } else if (kind === 'assign') {
      for (const key of gone) this.#gone.delete(key)
    }
    const results = await Promise.allSettled(this.listeners(kind).map((listener) => listener.call(this, partitions)))
    if (kind === 'revoke' || kind === 'lost') {
      this.#foldConsumed()
      for (const key of gone) this.#consumed.delete(key)
    }
    for (const result of results) {
      if (result.status === 'rejected') {
        if (this.listenerCount('error') > 0) this.emit('error', result.reason)
        else process.emitWarning(`ketch: a '${kind}' handler failed: ${String(result.reason)}`)
      }
    }
  }

  #dropBuffered(drop: (record: ConsumerRecord) => boolean): void {
    this.#foldConsumed()
    this.#buffer = this.#buffer.slice(this.#next).filter((record) => !drop(record))
    this.#next = 0
    this.#folded = 0
  }

  /**
   * Accounts the records handed out since the last fold in `#consumed`: per partition, the
   * offset after the last one. Done when the buffer changes or `#consumed` is read, not per
   * record (the loop's hot path only moves an index).
   */
  #foldConsumed(): void {
    if (this.#folded >= this.#next) return
    const seen = new Set<string>()
    let topic: string | undefined
    let partition = -1
    // Backwards: a partition's first record met is the last one handed out.
    for (let j = this.#next - 1; j >= this.#folded; j--) {
      const record = this.#buffer[j]!
      if (record.partition === partition && record.topic === topic) continue
      topic = record.topic
      partition = record.partition
      const key = partitionKey(topic, partition)
      if (seen.has(key)) continue
      seen.add(key)
      this.#consumed.set(key, { topic, partition, offset: record.offset + 1 })
    }
    this.#folded = this.#next
  }

  /** The next record (waits for one); rejects with `ClosedError` once closed. */
  recv(): Promise<ConsumerRecord> {
    const buffered = this.#take()
    if (buffered !== undefined) return Promise.resolve(buffered)
    return this.#nextRecord().then((record) => {
      if (record === undefined) throw closedError('the consumer')
      return record
    })
  }

  #take(): ConsumerRecord | undefined {
    return this.#next < this.#buffer.length ? this.#buffer[this.#next++] : undefined
  }

  /** The next record, or `undefined` once closed. One native receive at a time. */
  async #nextRecord(): Promise<ConsumerRecord | undefined> {
    for (;;) {
      const buffered = this.#take()
      if (buffered !== undefined) return buffered
      if (this.#closed) return undefined
      this.#receiving ??= this.#receive().finally(() => {
        this.#receiving = undefined
      })
      await this.#receiving
    }
  }

  async #receive(): Promise<undefined> {
    let chunk: native.RecordChunk
    try {
      chunk = await this.#native.recvPacked(this.#maxBatchRecords)
    } catch (error) {
      const failure = fromNative(error)
      if (failure instanceof ClosedError) {
        this.#closed = true
        return undefined
      }
      throw failure
    }
    if (this.#closed) return undefined
    let records = unpackRecords(chunk)
    if (this.#gone.size > 0) {
      records = records.filter((record) => !this.#gone.has(partitionKey(record.topic, record.partition)))
    }
    this.#foldConsumed()
    this.#buffer = this.#next < this.#buffer.length ? this.#buffer.slice(this.#next).concat(records) : records
    this.#next = 0
    this.#folded = 0
    return undefined
  }

  /**
   * The records, for `for await`. `break` stops reading but keeps the consumer open; records
   * read ahead stay buffered for the next loop or `recv`.
   */
  [Symbol.asyncIterator](): AsyncIterableIterator<ConsumerRecord> {
    const iterator: AsyncIterableIterator<ConsumerRecord> = {
      // Not async: a record already taken from the core resolves without another await.
      next: (): Promise<IteratorResult<ConsumerRecord>> => {
        const buffered = this.#take()
        if (buffered !== undefined) return Promise.resolve({ done: false, value: buffered })
        return this.#nextRecord().then((record) =>
          record === undefined ? { done: true, value: undefined } : { done: false, value: record },
        )
      },
      return: async () => ({ done: true, value: undefined }),
      [Symbol.asyncIterator]: () => iterator,
    }
    return iterator
  }

  /**
   * Commits, for every partition read, the offset after the last record the loop was given
   * (records read ahead but not yet handed out are not committed). Needs a group.
   */
  async commit(): Promise<void> {
    if (this.#released) throw closedError('the consumer')
    this.#foldConsumed()
    const offsets = [...this.#consumed.values()]
    if (offsets.length === 0) return
    await call(() => this.#native.commitOffsets(offsets))
  }

  /** Commits explicit offsets: per partition, the offset of the next record to read. */
  async commitOffsets(offsets: Array<TopicPartition & { offset: number }>): Promise<void> {
    if (this.#released) throw closedError('the consumer')
    await call(() => this.#native.commitOffsets(offsets))
  }

  /**
   * Moves a partition's position: to an offset, `'beginning'`, `'end'`, or `{ timestamp }`
   * (the first record at or after it). The next record from that partition is there. The
   * partition must be assigned to this consumer.
   */
  async seek(topic: string, partition: number, to: SeekTarget): Promise<void> {
    if (this.#closed) throw closedError('the consumer')
    let kind: string
    let value: number | undefined
    if (typeof to === 'number') {
      kind = 'offset'
      value = nonNegativeInteger(to, 'offset', Number.MAX_SAFE_INTEGER)
    } else if (to === 'beginning' || to === 'end') {
      kind = to
    } else if (to !== null && typeof to === 'object' && 'timestamp' in to) {
      kind = 'timestamp'
      value = to.timestamp instanceof Date ? to.timestamp.getTime() : to.timestamp
    } else {
      throw new InvalidArgumentError(`seek target must be an offset, 'beginning', 'end' or { timestamp }`, {
        code: 'invalid_argument',
      })
    }
    callSync(() => this.#native.seek(topic, partition, kind, value))
    this.#dropBuffered((record) => record.topic === topic && record.partition === partition)
    const key = partitionKey(topic, partition)
    if (kind === 'offset') this.#consumed.set(key, { topic, partition, offset: value! })
    else this.#consumed.delete(key)
  }

  /** The partitions assigned to this consumer now. */
  assignment(): TopicPartition[] {
    return callSync(() => this.#native.assignment())
  }

  /** The offset of the next record the loop will get from a partition, once known. */
  position(topic: string, partition: number): number | undefined {
    const buffered = this.#buffer.slice(this.#next).find((r) => r.topic === topic && r.partition === partition)
    if (buffered !== undefined) return buffered.offset
    return callSync(() => this.#native.position(topic, partition)) ?? undefined
  }

  /**
   * Commits (with auto-commit) what the loop was given, leaves the group, and stops. A
   * pending `recv` or loop ends. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#closed = true
      this.#handles.delete(this)
      this.#foldConsumed()
      // Give back what was read ahead, so the closing commit covers only what the loop saw.
      const firstUnread = new Map<string, ConsumerRecord>()
      for (const record of this.#buffer.slice(this.#next)) {
        const key = partitionKey(record.topic, record.partition)
        if (!firstUnread.has(key)) firstUnread.set(key, record)
      }
      this.#buffer = []
      this.#next = 0
      this.#folded = 0
      for (const record of firstUnread.values()) {
        try {
          this.#native.seek(record.topic, record.partition, 'offset', record.offset)
        } catch {
          // No longer assigned: its new owner reads from the committed offset.
        }
      }
      try {
        await call(() => this.#native.close())
      } finally {
        this.#released = true
      }
    })()
    return this.#closing
  }
}
