// Wasm filters uploaded from Node and applied on consume, against a real broker. The example
// modules are built for wasm32 by scripts/test-all.sh into
// target/wasm/wasm32-unknown-unknown/release (or $KETCH_WASM_DIR).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync } from 'node:fs'
import { resolve } from 'node:path'

import { Client, FilterError, InvalidArgumentError } from '../dist/index.js'
import { sdkDir, startBroker, take, uniqueTopic, within } from './broker.mjs'

const AMOUNTS = [50, 150, 99, 101]

function example(crate) {
  const dir = process.env.KETCH_WASM_DIR ?? resolve(sdkDir, '..', 'target', 'wasm', 'wasm32-unknown-unknown', 'release')
  const path = resolve(dir, `${crate}.wasm`)
  if (!existsSync(path)) {
    throw new Error(`${path} is missing: build the examples first (scripts/test-all.sh, or in wasm-filters/: cargo build --release --target wasm32-unknown-unknown --target-dir ../target/wasm)`)
  }
  return readFileSync(path)
}

let broker
let client
before(async () => {
  broker = await startBroker()
  client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert })
})
after(async () => {
  await client?.close()
  await broker?.stop()
})

async function produceAmounts(topic) {
  await client.createTopic(topic, { partitions: 1 })
  const producer = client.producer()
  await producer.sendMany(topic, AMOUNTS.map((amount) => ({ value: JSON.stringify({ amount }) })))
  await producer.close()
}

async function rejection(promise) {
  let caught
  await assert.rejects(promise, (error) => {
    caught = error
    return true
  })
  return caught
}

test('a Wasm filter uploaded from Node is applied on consume', async () => {
  const name = uniqueTopic('high-value')
  const module = example('json_field')
  // A Uint8Array view works as well as a Buffer.
  const view = new Uint8Array(module.buffer, module.byteOffset, module.byteLength)
  const deployed = await client.uploadFilter(name, view, { description: 'amount filter' })
  assert.deepEqual(
    { name: deployed.name, version: deployed.version, moduleBytes: deployed.moduleBytes, description: deployed.description },
    { name, version: 1, moduleBytes: module.length, description: 'amount filter' },
  )
  assert.match(deployed.digest, /^[0-9a-f]{64}$/)
  assert.equal((await client.uploadFilter(name, module)).version, 1, 'the same bytes: no new version')
  assert.ok((await client.listFilters()).some((f) => f.name === name))

  const topic = uniqueTopic('filtered')
  await produceAmounts(topic)
  const consumer = client.consumer({
    partitions: [{ topic, partition: 0 }],
    start: 'earliest',
    filter: name,
    filterParams: { field: 'amount', gt: 100 },
  })
  const records = await take(consumer, 2)
  // The broker keeps the source offsets of what the filter kept.
  assert.deepEqual(records.map((r) => [r.offset, r.value.toString()]), [[1, '{"amount":150}'], [3, '{"amount":101}']])
  const described = await client.describeFilter(name)
  assert.deepEqual(described.versions.map((v) => v.version), [1])
  assert.deepEqual(described.inUseBy, [`subscription to ${topic}/0`])
  const inUse = await rejection(client.deleteFilter(name))
  assert.ok(inUse instanceof FilterError, inUse.message)
  assert.equal(inUse.code, 'filter_in_use')
  assert.equal(inUse.module, name)
  await consumer.close()

  await client.deleteFilter(name)
  assert.ok(!(await client.listFilters()).some((f) => f.name === name))
  const gone = await rejection(client.describeFilter(name))
  assert.ok(gone instanceof FilterError)
  assert.equal(gone.code, 'unknown_filter')
})

test('a group reads through a filter with JSON-text params and a pinned version, and resumes after its commit', async () => {
  const name = uniqueTopic('pinned')
  await client.uploadFilter(name, example('json_field'))
  const topic = uniqueTopic('filtered')
  await produceAmounts(topic)
  const group = uniqueTopic('g')
  const options = { topics: [topic], group, start: 'earliest', autoCommit: false, filter: name, filterParams: '{"field":"amount","lt":100}', filterVersion: 1 }
  const first = client.consumer(options)
  const [record] = await take(first, 1)
  assert.deepEqual([record.offset, record.value.toString()], [0, '{"amount":50}'])
  await first.commit()
  await first.close()
  const second = client.consumer(options)
  const [next] = await take(second, 1)
  assert.deepEqual([next.offset, next.value.toString()], [2, '{"amount":99}'], 'resumes after the commit, through the filter')
  await second.close()
  await client.deleteFilter(name, { force: true })
})

test('a module that is not Wasm is refused with a FilterError naming it', async () => {
  const name = uniqueTopic('garbage')
  const error = await rejection(client.uploadFilter(name, Buffer.from('this is not a wasm module')))
  assert.ok(error instanceof FilterError, error.message)
  assert.equal(error.code, 'invalid_filter')
  assert.equal(error.module, name)
  assert.ok(error.reason.length > 0)
})

test('bad params and unknown filters reject the read with a FilterError', async () => {
  const name = uniqueTopic('strict')
  await client.uploadFilter(name, example('json_field'))
  const topic = uniqueTopic('filtered')
  await produceAmounts(topic)
  for (const [options, code, pattern] of [
    [{ filter: name, filterParams: { field: 'amount' } }, 'invalid_filter', /gt, gte, lt, lte, eq/],
    [{ filter: uniqueTopic('missing') }, 'unknown_filter', /unknown filter/],
  ]) {
    const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest', ...options })
    const error = await rejection(within(30_000, 'the read fails', consumer[Symbol.asyncIterator]().next()))
    assert.ok(error instanceof FilterError, error.message)
    assert.equal(error.code, code)
    assert.match(error.message, pattern)
    await consumer.close()
  }
  await client.deleteFilter(name, { force: true })
})

test('filterParams without a filter are refused', () => {
  assert.throws(
    () => client.consumer({ partitions: [{ topic: 't', partition: 0 }], filterParams: { gt: 1 } }),
    (error) => error instanceof InvalidArgumentError && /filterParams/.test(error.message),
  )
})
