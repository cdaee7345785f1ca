// Security: credentials, the error classes of refusals, and security administration.
//
// Against a real `ketch serve --auth required` (its admin token is the one it wrote to
// DATA_DIR/admin.token): the admin token works; a wrong, missing, revoked or expired token
// rejects with AuthenticationFailedError (46); a principal without an ACL gets
// NotAuthorizedError (29) on produce and consume and changes nothing, and the same calls work
// after an addAcls grant; tokens, ACLs and quotas are managed from Node. Against a broker that
// does not ask: the token and client-certificate options, and the wire-code mapping.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import {
  AuthenticationFailedError,
  BrokerUnavailableError,
  Client,
  FilterError,
  InvalidArgumentError,
  KetchError,
  NotAuthorizedError,
  RecordTooLargeError,
  TopicNotFoundError,
  aclToString,
} from '../dist/index.js'
import { fromNative } from '../dist/errors.js'
import { startBroker, uniqueTopic, within } from './broker.mjs'

/** An error as the native module rejects with it (src/encode.rs). */
function nativeRejection(code, raw, retriable, message) {
  return new Error(['KETCH', code, String(raw), retriable ? '1' : '0', message].join('\u001f'))
}

test('wire codes become their family, keeping code, number and message', () => {
  const cases = [
    ['unauthorized', 29, false, NotAuthorizedError],
    ['authentication_failed', 46, false, AuthenticationFailedError],
    ['unknown_topic', 6, true, TopicNotFoundError],
    ['record_too_large', 13, false, RecordTooLargeError],
    ['filter_failed', 44, false, FilterError],
    ['filter_in_use', 45, false, FilterError],
    ['shutting_down', 30, true, BrokerUnavailableError],
    ['not_coordinator', 34, true, BrokerUnavailableError],
    ['not_enough_replicas', 35, true, BrokerUnavailableError],
    ['fenced_leader_epoch', 36, true, BrokerUnavailableError],
    ['no_space', 40, true, BrokerUnavailableError],
    ['unknown', 9999, false, KetchError],
  ]
  for (const [code, raw, retriable, Class] of cases) {
    const message = `broker error ${code} (${raw}): the broker's reason`
    const error = fromNative(nativeRejection(code, raw, retriable, message))
    assert.equal(error.constructor, Class, code)
    assert.ok(error instanceof KetchError)
    assert.deepEqual([error.code, error.rawCode, error.retriable, error.message], [code, raw, retriable, message])
  }
})

test('a FilterError names the module and the reason', () => {
  const error = fromNative(nativeRejection('filter_failed', 44, false, 'broker error filter_failed (44): filter `high-value` v2 trapped: unreachable (record at offset 7)'))
  assert.ok(error instanceof FilterError)
  assert.equal(error.module, 'high-value')
  assert.equal(error.reason, 'trapped: unreachable (record at offset 7)')
})

let broker
let secure
let adminToken
let dir
before(async () => {
  broker = await startBroker()
  secure = await startBroker(['--auth', 'required'])
  adminToken = readFileSync(join(secure.dataDir, 'admin.token'), 'utf8').trim()
  dir = mkdtempSync(join(tmpdir(), 'ketch-node-certs-'))
})
after(async () => {
  await broker?.stop()
  await secure?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

/** A client of the `--auth required` broker with `token` (none: no token). */
function secureClient(token) {
  return Client.connect({ bootstrap: secure.bootstrap, caCert: secure.caCert, token, requestTimeoutMs: 10_000 })
}

function clientCertificate(name) {
  const cert = join(dir, `${name}.pem`)
  const key = join(dir, `${name}-key.pem`)
  // openssl makes the test's client certificate (Debian: apt-get install openssl).
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '1', '-subj', `/CN=${name}`], { stdio: 'ignore', timeout: 60_000 })
  return { cert, key }
}

async function rejection(promise) {
  let caught
  await assert.rejects(promise, (error) => {
    caught = error
    return true
  })
  return caught
}

test('a client certificate needs its key, and a token may not be empty', async () => {
  for (const [options, pattern] of [
    [{ clientCert: 'cert.pem' }, /clientKey/],
    [{ clientKey: 'key.pem' }, /clientCert/],
    [{ token: '' }, /token/],
  ]) {
    const error = await rejection(Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, ...options }))
    assert.ok(error instanceof InvalidArgumentError, error.message)
    assert.match(error.message, pattern)
  }
})

test('an unreadable client certificate: a tls error naming it', async () => {
  const error = await rejection(Client.connect({
    bootstrap: broker.bootstrap, caCert: broker.caCert,
    clientCert: join(dir, 'missing-cert.pem'), clientKey: join(dir, 'missing-key.pem'),
  }))
  assert.ok(error instanceof InvalidArgumentError, error.message)
  assert.equal(error.code, 'tls')
  assert.match(error.message, /missing-cert\.pem/)
})

test('a client certificate is accepted and a token checked by a broker that does not ask; a key of another certificate is refused', async () => {
  const { cert, key } = clientCertificate('node-client')
  const client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, clientCert: cert, clientKey: key })
  try {
    assert.ok(Array.isArray(await client.listTopics()))
  } finally {
    await client.close()
  }
  // A token is checked wherever it is presented, even where none is required.
  const refused = await rejection(Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, token: 'secret-token', clientCert: cert, clientKey: key }))
  assert.ok(refused instanceof AuthenticationFailedError, refused.message)
  const other = clientCertificate('other')
  const error = await rejection(Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, clientCert: cert, clientKey: other.key }))
  assert.equal(error.code, 'tls', error.message)
})

// --- against `ketch serve --auth required` ---------------------------------------------------

test('the admin token works; a wrong, forged or missing token is AuthenticationFailedError at connect', async () => {
  const admin = await secureClient(adminToken)
  try {
    const topic = uniqueTopic('auth')
    await admin.createTopic(topic, { partitions: 2 })
    assert.ok((await admin.listTopics()).some((t) => t.name === topic))
  } finally {
    await admin.close()
  }
  const forged = adminToken.slice(0, -4) + (adminToken.endsWith('0000') ? '1111' : '0000')
  for (const token of ['ketch_wrong', forged, undefined]) {
    const error = await rejection(secureClient(token))
    assert.ok(error instanceof AuthenticationFailedError, `${token}: ${error.message}`)
    assert.ok(!(error instanceof NotAuthorizedError))
    assert.deepEqual([error.code, error.rawCode, error.retriable], ['authentication_failed', 46, false])
  }
})

test('a principal without an ACL is refused produce and consume, changing nothing, until granted', { timeout: 120_000 }, async () => {
  const admin = await secureClient(adminToken)
  const topic = uniqueTopic('acl')
  const principal = uniqueTopic('alice')
  const group = uniqueTopic('g')
  await admin.createTopic(topic)
  const token = await admin.createToken(principal)
  assert.equal(token.principal, principal)
  assert.equal(token.expiresAtMs, null)
  assert.match(token.token, /^ketch_/)
  const alice = await secureClient(token.token)
  try {
    // Produce: no write anywhere, so no producer id.
    let error = await rejection(alice.producer().send(topic, { value: 'refused' }))
    assert.ok(error instanceof NotAuthorizedError, error.message)
    assert.equal(error.code, 'unauthorized')
    assert.match(error.message, new RegExp(principal))
    // Consume in a group: the group is refused, then (with the group granted) the topic.
    const next = async () => {
      const consumer = alice.consumer({ topics: [topic], group, start: 'earliest' })
      try {
        return await within(20_000, 'a consume', consumer[Symbol.asyncIterator]().next())
      } finally {
        await consumer.close().catch(() => {})
      }
    }
    error = await rejection(next())
    assert.ok(error instanceof NotAuthorizedError, error.message)
    assert.equal(await admin.addAcls({ principal, operation: 'read', group }), 1)
    error = await rejection(next())
    assert.ok(error instanceof NotAuthorizedError, error.message)
    assert.match(error.message, new RegExp(topic))
    // The refusals changed nothing: the topic is still empty.
    const described = await admin.describeTopic(topic)
    assert.equal(described.partitions[0].highWatermark, 0)

    assert.equal(await admin.addAcls([
      { principal, operation: 'write', topic },
      { principal, operation: 'read', topic },
    ]), 2)
    const producer = alice.producer()
    const md = await producer.send(topic, { key: 'k', value: 'granted' })
    assert.deepEqual([md.topic, md.offset], [topic, 0])
    await producer.close()
    const { value: record } = await next()
    assert.equal(record.key.toString(), 'k')
    assert.equal(record.value.toString(), 'granted')
    // Another topic: hidden while alice may not describe it (as in Kafka), refused once she may.
    const other = uniqueTopic('other')
    await admin.createTopic(other)
    const again = alice.producer()
    error = await rejection(again.send(other, { value: 'x' }))
    assert.ok(error instanceof TopicNotFoundError, error.message)
    await admin.addAcls({ principal, operation: 'describe', topic: other })
    error = await rejection(again.send(other, { value: 'x' }))
    assert.ok(error instanceof NotAuthorizedError, error.message)
    await again.close().catch(() => {})
    assert.equal((await admin.describeTopic(other)).partitions[0].highWatermark, 0)
  } finally {
    await alice.close().catch(() => {})
    await admin.close()
  }
})

test('a revoked token fails the next request; an expiring one stops by itself', { timeout: 60_000 }, async () => {
  const admin = await secureClient(adminToken)
  try {
    const principal = uniqueTopic('rev')
    const token = await admin.createToken(principal)
    const listed = (await admin.listTokens()).find((t) => t.id === token.id)
    assert.deepEqual([listed.principal, listed.revokedAtMs, listed.expiresAtMs], [principal, null, null])
    assert.ok(!JSON.stringify(await admin.listTokens()).includes(token.token), 'listTokens shows a secret')
    const client = await secureClient(token.token)
    await client.listTopics()
    assert.equal(await admin.revokeToken(token.id), token.id)
    const error = await rejection(client.listTopics())
    assert.ok(error instanceof AuthenticationFailedError, error.message)
    assert.match(error.message, /revoked/)
    await client.close()
    const revoked = (await admin.listTokens()).find((t) => t.id === token.id)
    assert.ok(revoked.revokedAtMs >= revoked.createdAtMs)
    // By the secret itself; an unknown one is an error.
    const second = await admin.createToken(principal)
    assert.equal(await admin.revokeToken(second.token), second.id)
    assert.ok((await rejection(admin.revokeToken('no-such-token'))) instanceof KetchError)

    const short = await admin.createToken(principal, { expiresInMs: 1500 })
    assert.ok(short.expiresAtMs > Date.now() - 60_000)
    const expiring = await secureClient(short.token)
    await expiring.listTopics()
    const deadline = Date.now() + 15_000
    for (;;) {
      const outcome = await expiring.listTopics().then(() => undefined, (e) => e)
      if (outcome !== undefined) {
        assert.ok(outcome instanceof AuthenticationFailedError, outcome.message)
        break
      }
      assert.ok(Date.now() < deadline, 'the token did not expire in 15 s')
      await new Promise((done) => setTimeout(done, 200))
    }
    await expiring.close()
    for (const expiresInMs of [0, -1, 1.5]) {
      const bad = await rejection(admin.createToken(principal, { expiresInMs }))
      assert.ok(bad instanceof InvalidArgumentError, bad.message)
    }
  } finally {
    await admin.close()
  }
})

test('ACLs are added, listed and removed; each names exactly one resource', async () => {
  const principal = uniqueTopic('acl')
  const rules = [
    { principal, operation: 'read', topicPrefix: 'orders.' },
    { principal, operation: 'write', topic: 'orders.eu', permission: 'deny' },
    { principal, operation: 'deploy-filter', cluster: true },
    { principal, operation: 'read', groupPrefix: 'billing-' },
    { principal, operation: 'read', filter: 'high-value' },
    { principal, operation: 'alter', transform: 't1' },
  ]
  assert.equal(aclToString(rules[0]), `allow ${principal} read topic-prefix orders.`)
  assert.equal(aclToString(rules[2]), `allow ${principal} deploy-filter cluster`)
  const canonical = (acl) => aclToString(acl)
  const admin = await secureClient(adminToken)
  try {
    assert.equal(await admin.addAcls(rules), rules.length)
    assert.equal(await admin.addAcls(rules[0]), 0)
    const mine = (await admin.listAcls()).filter((a) => a.principal === principal)
    assert.deepEqual(mine.map(canonical).sort(), rules.map(canonical).sort())
    // What listAcls gives goes back into removeAcls.
    const listedDeny = mine.find((a) => a.permission === 'deny')
    assert.deepEqual(listedDeny, { principal, operation: 'write', permission: 'deny', topic: 'orders.eu' })
    assert.equal(await admin.removeAcls([listedDeny, rules[0]]), 2)
    assert.equal(await admin.removeAcls([listedDeny, rules[0]]), 0)
    const left = (await admin.listAcls()).filter((a) => a.principal === principal)
    assert.deepEqual(left.map(canonical).sort(), rules.slice(2).map(canonical).sort())
    assert.equal(await admin.removeAcls(rules.slice(2)), rules.length - 2)

    for (const [acl, pattern] of [
      [{ principal, operation: 'read' }, /exactly one resource/],
      [{ principal, operation: 'read', topic: 'a', group: 'b' }, /exactly one resource/],
      [{ principal, operation: 'read', topic: 'a', cluster: true }, /exactly one resource/],
      [{ principal, operation: 'read', topic: '' }, /topic must be a non-empty string/],
      [{ principal, operation: 'fly', topic: 'a' }, /operation.*read, write/],
      [{ principal, operation: 'read', topic: 'a', permission: 'maybe' }, /permission/],
      [{ principal: '', operation: 'read', topic: 'a' }, /principal/],
    ]) {
      const error = await rejection(admin.addAcls(acl))
      assert.ok(error instanceof InvalidArgumentError, error.message)
      assert.match(error.message, pattern)
    }
  } finally {
    await admin.close()
  }
})

test('quotas are set, listed and removed', async () => {
  const principal = uniqueTopic('q')
  const admin = await secureClient(adminToken)
  try {
    const mine = async () => (await admin.listQuotas()).filter((q) => q.principal === principal)
    await admin.setQuota(principal, { produceBytesPerS: 1_000_000, fetchBytesPerS: 2_000_000 })
    assert.deepEqual(await mine(), [{ principal, produceBytesPerS: 1_000_000, fetchBytesPerS: 2_000_000 }])
    await admin.setQuota(principal, { fetchBytesPerS: 5 })
    assert.deepEqual(await mine(), [{ principal, produceBytesPerS: 0, fetchBytesPerS: 5 }])
    await admin.setQuota(principal)
    assert.deepEqual(await mine(), [])
    for (const rates of [{ produceBytesPerS: -1 }, { fetchBytesPerS: 1.5 }]) {
      assert.ok((await rejection(admin.setQuota(principal, rates))) instanceof InvalidArgumentError)
    }
  } finally {
    await admin.close()
  }
})

test('security admin needs alter on the cluster', async () => {
  const admin = await secureClient(adminToken)
  const token = await admin.createToken(uniqueTopic('plain'))
  await admin.close()
  const client = await secureClient(token.token)
  try {
    for (const call of [
      () => client.createToken('x'), () => client.listTokens(), () => client.listAcls(), () => client.listQuotas(),
      () => client.addAcls({ principal: 'x', operation: 'all', cluster: true }),
      () => client.setQuota('x', { produceBytesPerS: 1 }), () => client.revokeToken('x'),
    ]) {
      const error = await rejection(call())
      assert.ok(error instanceof NotAuthorizedError, error.message)
    }
  } finally {
    await client.close()
  }
})
