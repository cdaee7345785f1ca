// Error classes and codes, from real broker errors where the broker is the one refusing.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'

import {
  BrokerUnavailableError,
  Client,
  ClosedError,
  FilterError,
  InvalidArgumentError,
  KetchError,
  NotAuthorizedError,
  RecordTooLargeError,
  TopicAlreadyExistsError,
  TopicNotFoundError,
} from '../dist/index.js'
import { startBroker, uniqueTopic } from './broker.mjs'

const BROKER_BATCH_BYTES_MAX = 64 * 1024

let broker
let client
before(async () => {
  // A broker that refuses batches over 64 KiB, while the client would send up to 1 MiB.
  broker = await startBroker(['--batch-bytes-max', String(BROKER_BATCH_BYTES_MAX)])
  client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert, requestTimeoutMs: 5_000 })
})
after(async () => {
  await client?.close()
  await broker?.stop()
})

/** Asserts that `promise` rejects with an instance of `Class` with `code`; returns the error. */
async function rejectsWith(promise, Class, code) {
  let caught
  await assert.rejects(promise, (error) => {
    caught = error
    return true
  })
  assert.ok(caught instanceof Class, `${caught?.name}: ${caught?.message} is not a ${Class.name}`)
  assert.ok(caught instanceof KetchError)
  assert.ok(caught instanceof Error)
  assert.equal(caught.code, code, caught.message)
  assert.equal(caught.name, Class.name)
  return caught
}

test('the class hierarchy', () => {
  for (const Class of [TopicNotFoundError, RecordTooLargeError, NotAuthorizedError, FilterError, BrokerUnavailableError, ClosedError]) {
    const error = new Class('m', { code: 'c' })
    assert.ok(error instanceof KetchError && error instanceof Error)
    assert.equal(error.code, 'c')
  }
})

test('an unknown topic: TopicNotFoundError with the wire code', async () => {
  const missing = uniqueTopic('missing')
  const error = await rejectsWith(client.deleteTopic(missing), TopicNotFoundError, 'unknown_topic')
  assert.equal(error.rawCode, 6)
  assert.match(error.message, new RegExp(missing))
  assert.match(error.stack, /errors\.test\.mjs/, 'the stack shows the caller')
  const producer = client.producer()
  try {
    await rejectsWith(producer.send(missing, { value: 'x' }), TopicNotFoundError, 'unknown_topic')
  } finally {
    await producer.close()
  }
})

test('an existing topic: TopicAlreadyExistsError', async () => {
  const topic = uniqueTopic('exists')
  await client.createTopic(topic)
  const error = await rejectsWith(client.createTopic(topic), TopicAlreadyExistsError, 'topic_already_exists')
  assert.equal(error.rawCode, 8)
  assert.equal(error.retriable, false)
})

test('a record the broker refuses as too large fails alone with RecordTooLargeError', async () => {
  const topic = uniqueTopic('large')
  await client.createTopic(topic)
  const producer = client.producer({ lingerMs: 0 })
  try {
    const error = await rejectsWith(
      producer.send(topic, { value: Buffer.alloc(BROKER_BATCH_BYTES_MAX * 2) }),
      RecordTooLargeError,
      'record_too_large',
    )
    assert.equal(error.rawCode, 13)
    // The client refuses what it could never buffer, before the broker sees it.
    const small = client.producer({ bufferBytesMax: 512 * 1024, batchBytesMax: 256 * 1024 })
    const local = await rejectsWith(small.send(topic, { value: Buffer.alloc(600 * 1024) }), RecordTooLargeError, 'record_too_large')
    assert.match(local.message, /exceeds the limit/)
    await small.close()
    const fits = await producer.send(topic, { value: 'small' })
    assert.equal(fits.topic, topic)
  } finally {
    await producer.close()
  }
})

test('bad input: InvalidArgumentError naming the problem, nothing sent', async () => {
  const topic = uniqueTopic('bad')
  await client.createTopic(topic)
  const producer = client.producer()
  try {
    await rejectsWith(producer.send(topic, { value: 42 }), InvalidArgumentError, 'invalid_argument')
    await rejectsWith(producer.send(topic, { value: 'x', partition: -1 }), InvalidArgumentError, 'invalid_argument')
    await rejectsWith(producer.sendMany(topic, [{ value: 'ok' }, { key: {} }]), InvalidArgumentError, 'invalid_argument')
    await rejectsWith(producer.send(topic, { value: 'x', partition: 7 }), TopicNotFoundError, 'unknown_partition')
    assert.throws(() => client.consumer({ topics: [topic] }), (error) => error instanceof InvalidArgumentError && /group/.test(error.message))
    assert.throws(() => client.consumer({ partitions: [{ topic, partition: 0 }], start: 'sometime' }), InvalidArgumentError)
    const badProducer = client.producer({ acks: 'most' })
    await rejectsWith(badProducer.send(topic, { value: 'x' }), InvalidArgumentError, 'config')
    await badProducer.close()
    const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
    await rejectsWith(consumer.seek(topic, 5, 0), KetchError, 'invalid_operation')
    await rejectsWith(consumer.seek(topic, 0, 'middle'), InvalidArgumentError, 'invalid_argument')
    await consumer.close()
  } finally {
    await producer.close()
  }
  // Nothing of the refused calls reached the log.
  const [partition] = (await client.describeTopic(topic)).partitions
  assert.equal(partition.highWatermark, 0)
})

test('closed handles reject with ClosedError', async () => {
  const topic = uniqueTopic('closed')
  await client.createTopic(topic)
  const producer = client.producer()
  await producer.close()
  await producer.close()
  await rejectsWith(producer.send(topic, { value: 'x' }), ClosedError, 'closed')
  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
  const pending = rejectsWith(consumer.recv(), ClosedError, 'closed')
  await consumer.close()
  await pending
  await rejectsWith(consumer.commit(), ClosedError, 'closed')
  const other = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert })
  await other.close()
  await rejectsWith(other.listTopics(), ClosedError, 'closed')
})

test('no broker: BrokerUnavailableError with the cause kept', async () => {
  const error = await rejectsWith(
    Client.connect({ bootstrap: '127.0.0.1:9', caCert: broker.caCert, connectTimeoutMs: 500, requestTimeoutMs: 1_000 }),
    BrokerUnavailableError,
    'connect',
  )
  assert.equal(error.retriable, true)
  assert.match(error.message, /127\.0\.0\.1:9/)
})

test('an unreadable CA file: an error naming it', async () => {
  const error = await rejectsWith(
    Client.connect({ bootstrap: broker.bootstrap, caCert: '/nonexistent/ca.pem' }),
    InvalidArgumentError,
    'tls',
  )
  assert.match(error.message, /nonexistent/)
})

