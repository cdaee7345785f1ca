/**
 * Errors of the Ketch SDK: one root class with a stable `code`, one subclass per family.
 *
 * `code` is the broker's wire error name (`unknown_topic`, `record_too_large`, ...) or a
 * client-side kind (`closed`, `connect`, `transport`, `timeout`, `config`,
 * `invalid_argument`, ...). It never changes meaning; branch on it or on the class.
 */

/** Fields every Ketch error carries. */
export interface KetchErrorOptions {
  code: string
  /** The wire error number when there is one (it may be newer than this SDK). */
  rawCode?: number
  retriable?: boolean
  cause?: unknown
}

/** The root of every error this SDK throws or rejects with. */
export class KetchError extends Error {
  /** Stable error name, e.g. `unknown_topic`. */
  readonly code: string
  /** The number on the wire, when the error came from (or maps to) a wire code. */
  readonly rawCode: number | undefined
  /** Whether the same call may succeed later (the client already retried within its limits). */
  readonly retriable: boolean

  constructor(message: string, options: KetchErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.name = new.target.name
    this.code = options.code
    this.rawCode = options.rawCode
    this.retriable = options.retriable ?? false
  }
}

/** The topic (or partition) does not exist. */
export class TopicNotFoundError extends KetchError {}
/** `createTopic` of a name that exists. */
export class TopicAlreadyExistsError extends KetchError {}
/** A record larger than the producer or the broker accepts. */
export class RecordTooLargeError extends KetchError {}
/**
 * The broker knows who this client is, and no ACL lets it do the operation (`unauthorized`,
 * wire code 29). Nothing was changed; an admin's `addAcls` grant makes the same call work.
 */
export class NotAuthorizedError extends KetchError {}
/**
 * The broker does not accept this client's credentials: a wrong, revoked or expired token, or
 * none where one is required (`authentication_failed`, wire code 46). Not a
 * `NotAuthorizedError`: the remedy is new credentials, not an ACL grant (as Kafka separates
 * authentication from authorization). A token revoked while in use fails the next request.
 */
export class AuthenticationFailedError extends KetchError {}
/**
 * A Wasm filter is unknown, invalid, failed on a record, or in use (`unknown_filter`,
 * `invalid_filter`, `filter_rejected`, `filter_failed`, `filter_in_use`). `module` names the
 * filter when the broker says which; `reason` is why.
 */
export class FilterError extends KetchError {
  readonly module: string | undefined
  readonly reason: string

  constructor(message: string, options: KetchErrorOptions) {
    super(message, options)
    const parts = filterParts(message)
    this.module = parts.module
    this.reason = parts.reason
  }
}

/**
 * A filter error's module and reason from the broker's message, which names the module in
 * backquotes when it knows it: ``filter `high-value` v2 trapped: ...``, ``filter `x` refused:
 * ...``, ``unknown filter `x` ``.
 */
export function filterParts(message: string): { module: string | undefined; reason: string } {
  const text = message.replace(/^broker error [a-z_]+ \(\d+\): /, '')
  const match = /^(.*?)`([^`]+)`\s*(?:v\d+ )?(?:refused:)?\s*([\s\S]*)$/.exec(text)
  if (match === null) return { module: undefined, reason: text }
  const [, before, module, after] = match
  return { module, reason: after!.trim() === '' ? before!.trim() : after!.trim() }
}
/**
 * A topic-to-topic transform of that name does not exist (`unknown_transform`) or exists
 * already (`transform_exists`). A module failing inside a transform shows in its status
 * (`lastError`), not as an error.
 */
export class TransformError extends KetchError {}
/** No broker could be reached, or the connection broke (the client retried first). */
export class BrokerUnavailableError extends KetchError {}
/** The client, producer or consumer was closed. */
export class ClosedError extends KetchError {}
/** An operation did not finish in its time limit. */
export class TimeoutError extends KetchError {}
/** A consumer's position is outside the partition's log (with `start: 'error'`). */
export class OffsetOutOfRangeError extends KetchError {}
/** A bad option or argument: the message names it. */
export class InvalidArgumentError extends KetchError {}

type KetchErrorClass = new (message: string, options: KetchErrorOptions) => KetchError

/** Which class each code belongs to; codes not listed are plain `KetchError`s. */
const CLASSES: Record<string, KetchErrorClass> = {
  unknown_topic: TopicNotFoundError,
  unknown_partition: TopicNotFoundError,
  topic_already_exists: TopicAlreadyExistsError,
  record_too_large: RecordTooLargeError,
  frame_too_large: RecordTooLargeError,
  unauthorized: NotAuthorizedError,
  authentication_failed: AuthenticationFailedError,
  unknown_transform: TransformError,
  transform_exists: TransformError,
  unknown_filter: FilterError,
  invalid_filter: FilterError,
  filter_rejected: FilterError,
  filter_failed: FilterError,
  filter_in_use: FilterError,
  connect: BrokerUnavailableError,
  transport: BrokerUnavailableError,
  shutting_down: BrokerUnavailableError,
  not_leader: BrokerUnavailableError,
  overloaded: BrokerUnavailableError,
  not_coordinator: BrokerUnavailableError,
  not_enough_replicas: BrokerUnavailableError,
  fenced_leader_epoch: BrokerUnavailableError,
  no_space: BrokerUnavailableError,
  closed: ClosedError,
  timeout: TimeoutError,
  offset_out_of_range: OffsetOutOfRangeError,
  config: InvalidArgumentError,
  tls: InvalidArgumentError,
  invalid_argument: InvalidArgumentError,
  invalid_config: InvalidArgumentError,
  invalid_topic_name: InvalidArgumentError,
  invalid_partitions: InvalidArgumentError,
  invalid_group_id: InvalidArgumentError,
}

/** A Ketch error of the class its code belongs to. */
export function ketchError(message: string, options: KetchErrorOptions): KetchError {
  const Class = CLASSES[options.code] ?? KetchError
  return new Class(message, options)
}

/** The marker and separator of errors encoded by the native module (`src/error.rs`). */
const MARK = 'KETCH\u001f'
const SEPARATOR = '\u001f'

/** Decodes an encoded native error message; `undefined` if it is not one. */
export function decodeNativeMessage(
  encoded: string,
): { message: string; code: string; rawCode: number | undefined; retriable: boolean } | undefined {
  if (!encoded.startsWith(MARK)) return undefined
  const fields = encoded.slice(MARK.length).split(SEPARATOR)
  if (fields.length < 4) return undefined
  const [code, raw, retriable] = fields
  const rawCode = Number(raw)
  return {
    code: code!,
    rawCode: Number.isInteger(rawCode) && rawCode >= 0 ? rawCode : undefined,
    retriable: retriable === '1',
    message: fields.slice(3).join(SEPARATOR),
  }
}

/**
 * The Ketch error for whatever the native module threw: its encoded fields, with the
 * native error's `cause` chain kept. Anything else (a napi argument conversion error) is an
 * `InvalidArgumentError` whose cause is the original.
 */
export function fromNative(error: unknown): KetchError {
  if (error instanceof KetchError) return error
  if (error instanceof Error) {
    const decoded = decodeNativeMessage(error.message)
    if (decoded !== undefined) {
      const cause = (error as { cause?: unknown }).cause
      return ketchError(decoded.message, { ...decoded, cause: cause ?? undefined })
    }
    return new InvalidArgumentError(error.message, { code: 'invalid_argument', cause: error })
  }
  return new KetchError(String(error), { code: 'unknown', cause: error })
}

/** Runs a native call, turning what it throws into a Ketch error thrown from here. */
export async function call<T>(operation: () => Promise<T> | T): Promise<T> {
  try {
    return await operation()
  } catch (error) {
    throw fromNative(error)
  }
}

/** Like `call`, for synchronous native calls. */
export function callSync<T>(operation: () => T): T {
  try {
    return operation()
  } catch (error) {
    throw fromNative(error)
  }
}
