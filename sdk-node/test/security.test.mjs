// Security options: a bearer token and a client certificate reach the core's settings, and the
// wire code `unauthorized` (29) becomes a NotAuthorizedError. Brokers that ask for credentials
// come with the security issue (14); until then the options are checked as far as the client
// goes (loaded, presented, accepted by a broker that does not ask), and the error mapping
// through the decoder every native rejection takes.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import {
  BrokerUnavailableError,
  Client,
  FilterError,
  InvalidArgumentError,
  KetchError,
  NotAuthorizedError,
  RecordTooLargeError,
  TopicNotFoundError,
} from '../dist/index.js'
import { fromNative } from '../dist/errors.js'
import { startBroker } from './broker.mjs'

/** An error as the native module rejects with it (src/encode.rs). */
function nativeRejection(code, raw, retriable, message) {
  return new Error(['KETCH', code, String(raw), retriable ? '1' : '0', message].join('\u001f'))
}

test('wire codes become their family, keeping code, number and message', () => {
  const cases = [
    ['unauthorized', 29, false, NotAuthorizedError],
    ['unknown_topic', 6, true, TopicNotFoundError],
    ['record_too_large', 13, false, RecordTooLargeError],
    ['filter_failed', 44, false, FilterError],
    ['filter_in_use', 45, false, FilterError],
    ['shutting_down', 30, true, BrokerUnavailableError],
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
let dir
before(async () => {
  broker = await startBroker()
  dir = mkdtempSync(join(tmpdir(), 'ketch-node-certs-'))
})
after(async () => {
  await broker?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

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

test('a token and a client certificate are accepted by a broker that does not ask; a key of another certificate is refused', async () => {
  const { cert, key } = clientCertificate('node-client')
  const client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, token: 'secret-token', clientCert: cert, clientKey: key })
  try {
    assert.ok(Array.isArray(await client.listTopics()))
  } finally {
    await client.close()
  }
  const other = clientCertificate('other')
  const error = await rejection(Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, clientCert: cert, clientKey: other.key }))
  assert.equal(error.code, 'tls', error.message)
})
