/**
 * Security administration types: API tokens, ACLs and quotas, and their conversion to and
 * from the native module's wire-name objects. The calls are `Client` methods.
 */

import type * as native from '../native/index.js'
import { InvalidArgumentError } from './errors'

/** What a principal does to a resource. `read` and `write` imply `describe`. */
export type AclOperation = 'read' | 'write' | 'create' | 'delete' | 'describe' | 'alter' | 'deploy-filter' | 'all'

/** The one resource an ACL is about: a topic (or every topic with a prefix), a group (or prefix), a Wasm filter, a transform, or the cluster. */
export type AclResource =
  | { topic: string }
  | { topicPrefix: string }
  | { group: string }
  | { groupPrefix: string }
  | { filter: string }
  | { transform: string }
  | { cluster: true }

/**
 * One access rule: `principal` (`'*'` for everyone) may (`permission: 'allow'`, the default)
 * or may not (`'deny'`, which wins over any allow) do `operation` on one resource. What
 * `listAcls` resolves with can be given back to `removeAcls`.
 *
 * ```ts
 * { principal: 'alice', operation: 'read', topicPrefix: 'orders.' }
 * { principal: 'alice', operation: 'write', topic: 'orders', permission: 'deny' }
 * ```
 */
export type Acl = { principal: string; operation: AclOperation; permission?: 'allow' | 'deny' } & AclResource

/** An ACL as `listAcls` gives it: `permission` always set. */
export type AclBinding = Acl & { permission: 'allow' | 'deny' }

/** A token just made: `token` is the secret (give it to `Client.connect({ token })`), shown this once. */
export interface NewToken {
  id: string
  principal: string
  token: string
  /** When it stops working (ms since the epoch); `null`: never. */
  expiresAtMs: number | null
}

/** A token the broker knows, without its secret. */
export interface TokenInfo {
  id: string
  principal: string
  createdAtMs: number
  expiresAtMs: number | null
  /** When it was revoked; `null` while it is not. */
  revokedAtMs: number | null
}

/** A principal's byte rates; 0 is no limit. */
export interface Quota {
  principal: string
  produceBytesPerS: number
  fetchBytesPerS: number
}

const RESOURCES = [
  ['topic', 'topic', 'literal'],
  ['topicPrefix', 'topic', 'prefix'],
  ['group', 'group', 'literal'],
  ['groupPrefix', 'group', 'prefix'],
  ['filter', 'filter', 'literal'],
  ['transform', 'transform', 'literal'],
] as const

function invalid(message: string): InvalidArgumentError {
  return new InvalidArgumentError(message, { code: 'invalid_argument' })
}

/** The native object of an ACL; the resource must be named exactly once. */
export function toNativeAcl(acl: Acl): native.NativeAcl {
  if (acl === null || typeof acl !== 'object') throw invalid(`an ACL must be an object, not ${String(acl)}`)
  const fields = acl as unknown as Record<string, unknown>
  const named = RESOURCES.filter(([field]) => fields[field] !== undefined)
  const cluster = fields.cluster !== undefined
  if (named.length + (cluster ? 1 : 0) !== 1) {
    throw invalid('an ACL names exactly one resource: topic, topicPrefix, group, groupPrefix, filter, transform or cluster: true')
  }
  if (cluster && fields.cluster !== true) throw invalid('cluster must be true')
  const [field, resourceType, pattern] = cluster ? ['cluster', 'cluster', 'literal'] as const : named[0]!
  const resourceName = cluster ? '' : fields[field]
  if (typeof resourceName !== 'string' || (!cluster && resourceName === '')) {
    throw invalid(`${field} must be a non-empty string`)
  }
  return {
    principal: String(acl.principal ?? ''),
    resourceType,
    pattern,
    resourceName,
    operation: String(acl.operation),
    permission: acl.permission ?? 'allow',
  }
}

/** The facade's ACL for a native one. */
export function fromNativeAcl(acl: native.NativeAcl): AclBinding {
  const base = {
    principal: acl.principal,
    operation: acl.operation as AclOperation,
    permission: acl.permission as 'allow' | 'deny',
  }
  if (acl.resourceType === 'cluster') return { ...base, cluster: true }
  const entry = RESOURCES.find(([, type, pattern]) => type === acl.resourceType && pattern === acl.pattern)
  if (entry === undefined) throw invalid(`an ACL of an unknown kind: ${acl.resourceType}/${acl.pattern}`)
  return { ...base, [entry[0]]: acl.resourceName } as AclBinding
}

/** `allow alice read topic-prefix orders.`: the CLI's form of an ACL. */
export function aclToString(acl: Acl): string {
  const n = toNativeAcl(acl)
  const resource = n.resourceType === 'cluster'
    ? 'cluster'
    : `${n.resourceType}${n.pattern === 'prefix' ? '-prefix' : ''} ${n.resourceName}`
  return `${n.permission} ${n.principal} ${n.operation} ${resource}`
}

export function fromNativeToken(t: native.NativeNewToken): NewToken {
  return { id: t.id, principal: t.principal, token: t.token, expiresAtMs: t.expiresAtMs ?? null }
}

export function fromNativeTokenDescription(t: native.NativeTokenDescription): TokenInfo {
  return {
    id: t.id,
    principal: t.principal,
    createdAtMs: t.createdAtMs,
    expiresAtMs: t.expiresAtMs ?? null,
    revokedAtMs: t.revokedAtMs ?? null,
  }
}

/** A rate for `setQuota`: a non-negative safe integer (0: no limit). */
export function rate(value: unknown, name: string): number {
  if (value === undefined) return 0
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return value
  throw invalid(`${name} must be a non-negative integer, not ${String(value)}`)
}
