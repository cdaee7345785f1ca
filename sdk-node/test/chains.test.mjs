// Produce chains and topic-to-topic transforms managed from Node, against a real broker: a
// chain of the json_validate example refuses ('fail'), drops ('skip') or dead-letters bad
// records on the produce path; a transform of json_field copies what the module keeps from one
// topic to another, and is paused, resumed and deleted. Modules come from target/wasm as in
// filter.test.mjs.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readFileSync } from 'node:fs'
import { resolve } from 'node:path'

import { Client, FilterError, InvalidArgumentError, KetchError, TransformError } from '../dist/index.js'
import { sdkDir, startBroker, take, uniqueTopic } from './broker.mjs'

const WAIT_MS = 30_000

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

async function rejection(promise) {
  let caught
  await assert.rejects(promise, (error) => {
    caught = error
    return true
  })
  return caught
}

/** The values of partition 0 of `topic`: `count` of them, and any that arrive soon after. */
async function readAll(topic, count) {
  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
  try {
    const values = (await take(consumer, count, WAIT_MS)).map((r) => r.value.toString())
    const extra = await Promise.race([consumer.recv(), new Promise((done) => setTimeout(done, 300, undefined))])
    if (extra !== undefined) values.push(extra.value.toString())
    return values
  } finally {
    await consumer.close()
  }
}

async function waitFor(what, check) {
  const deadline = Date.now() + WAIT_MS
  while (!(await check())) {
    assert.ok(Date.now() < deadline, `${what} within ${WAIT_MS} ms`)
    await new Promise((done) => setTimeout(done, 100))
  }
}

test('a produce chain fails, skips or dead-letters bad records', { timeout: 120_000 }, async () => {
  const validate = uniqueTopic('validate')
  await client.uploadFilter(validate, example('json_validate'))
  const topic = uniqueTopic('chained')
  const dlq = uniqueTopic('dlq')
  await client.createTopic(topic)
  await client.createTopic(dlq)
  assert.deepEqual((await client.topicFilters(topic)).filters, [])

  assert.deepEqual(await client.setTopicFilters(topic, [validate]), [{ name: validate, version: 1 }])
  const chain = await client.topicFilters(topic)
  assert.deepEqual([chain.topic, chain.filters, chain.onError], [topic, [{ name: validate, version: 1 }], 'fail'])
  let producer = client.producer()
  assert.equal((await producer.send(topic, { value: '{"ok": 1}' })).offset, 0)
  const error = await rejection(producer.send(topic, { value: '{bad' }))
  assert.ok(error instanceof FilterError, error.message)
  assert.equal(error.code, 'filter_rejected')
  assert.equal(error.module, validate)
  await producer.close()

  await client.setTopicFilters(topic, [validate], { onError: 'skip' })
  producer = client.producer()
  await producer.sendMany(topic, [{ value: '{bad' }, { value: '{"ok": 2}' }])
  await producer.close()

  await client.setTopicFilters(topic, [validate], { onError: `dead-letter:${dlq}` })
  assert.equal((await client.topicFilters(topic)).onError, `dead-letter:${dlq}`)
  producer = client.producer()
  await producer.send(topic, { value: '{worse' })
  await producer.close()
  assert.deepEqual(await readAll(dlq, 1), ['{worse'])

  await client.clearTopicFilters(topic)
  assert.deepEqual((await client.topicFilters(topic)).filters, [])
  producer = client.producer()
  await producer.send(topic, { value: 'not json' })
  await producer.close()
  assert.deepEqual(await readAll(topic, 3), ['{"ok": 1}', '{"ok": 2}', 'not json'])
})

test('bad chain arguments', async () => {
  const topic = uniqueTopic('chained')
  await client.createTopic(topic)
  let error = await rejection(client.setTopicFilters(topic, ['x'], { onError: 'ignore' }))
  assert.ok(error instanceof InvalidArgumentError, error.message)
  assert.match(error.message, /onError/)
  error = await rejection(client.setTopicFilters(topic, [uniqueTopic('missing')]))
  assert.ok(error instanceof FilterError, error.message)
  const validate = uniqueTopic('validate')
  await client.uploadFilter(validate, example('json_validate'))
  // A module refusing its params fails the call and leaves no chain.
  error = await rejection(client.setTopicFilters(topic, [validate], { params: '{nope' }))
  assert.ok(error instanceof KetchError)
  assert.match(error.message, /params are not JSON/)
  assert.deepEqual((await client.topicFilters(topic)).filters, [])
})

test('a transform is created, listed, paused, resumed and deleted', { timeout: 120_000 }, async () => {
  const high = uniqueTopic('high-value')
  await client.uploadFilter(high, example('json_field'))
  const input = uniqueTopic('in')
  const output = uniqueTopic('out')
  const name = uniqueTopic('tx')
  await client.createTopic(input)
  await client.createTopic(output)
  let producer = client.producer()
  await producer.sendMany(input, [50, 150, 99, 101].map((amount) => ({ value: `{"amount": ${amount}}` })))
  await producer.close()
  const status = await client.createTransform(name, {
    filter: high, input, outputs: [output], start: 'beginning', params: { field: 'amount', gt: 100 },
  })
  assert.deepEqual([status.name, status.filter, status.filterVersion, status.input, status.outputs], [name, high, 1, input, [output]])
  assert.ok((await client.listTransforms()).some((t) => t.name === name))
  assert.deepEqual(await readAll(output, 2), ['{"amount": 150}', '{"amount": 101}'])
  await waitFor('recordsIn 4, lag 0', async () => {
    const s = await client.describeTransform(name)
    return s.recordsIn === 4 && s.lag === 0
  })

  await client.pauseTransform(name)
  await waitFor('paused', async () => (await client.describeTransform(name)).status === 'paused')
  producer = client.producer()
  await producer.send(input, { value: '{"amount": 500}' })
  await producer.close()
  await waitFor('lag 1 while paused', async () => (await client.describeTransform(name)).lag === 1)
  assert.equal((await client.describeTransform(name)).recordsIn, 4)
  await client.resumeTransform(name)
  assert.deepEqual(await readAll(output, 3), ['{"amount": 150}', '{"amount": 101}', '{"amount": 500}'])

  let error = await rejection(client.createTransform(name, { filter: high, input, outputs: [output] }))
  assert.ok(error instanceof TransformError, error.message)
  assert.equal(error.code, 'transform_exists')
  await client.deleteTransform(name)
  assert.ok(!(await client.listTransforms()).some((t) => t.name === name))
  error = await rejection(client.describeTransform(name))
  assert.ok(error instanceof TransformError, error.message)
  assert.equal(error.code, 'unknown_transform')
  for (const start of ['middle', -1, 1.5]) {
    error = await rejection(client.createTransform(name, { filter: high, input, outputs: [output], start }))
    assert.ok(error instanceof InvalidArgumentError, `${start}: ${error.message}`)
  }
})
