// Round trips through a real broker: keys, values of every accepted type, headers, explicit
// partitions and timestamps, send and sendMany, admin calls.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'

import { Client } from '../dist/index.js'
import { startBroker, take, uniqueTopic } from './broker.mjs'

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

test('topics: create, list, describe, delete', async () => {
  const topic = uniqueTopic('admin')
  await client.createTopic(topic, { partitions: 3 })
  const listed = (await client.listTopics()).find((t) => t.name === topic)
  assert.deepEqual(listed, { name: topic, partitions: 3, replicationFactor: 1 })
  const described = await client.describeTopic(topic)
  assert.equal(described.partitions.length, 3)
  await client.deleteTopic(topic)
  assert.equal((await client.listTopics()).find((t) => t.name === topic), undefined)
})

test('records round trip with keys, values and headers of every accepted type', async () => {
  const topic = uniqueTopic('roundtrip')
  await client.createTopic(topic, { partitions: 1 })
  const producer = client.producer({ acks: 'all', lingerMs: 1 })
  const sent = [
    { key: 'user-1', value: Buffer.from('buffer value'), headers: { source: 'web', trace: Buffer.from([0, 1, 2]) } },
    { key: new Uint8Array([1, 2, 3]), value: 'a string value ✓' },
    { key: null, value: new Uint8Array(Buffer.from('typed array')).subarray(6) },
    { value: null, headers: [['dup', 'first'], ['dup', 'second'], ['nullable', null]] },
    { key: 'k', value: Buffer.alloc(0), timestamp: 1_700_000_000_123 },
  ]
  const metadata = []
  for (const record of sent) metadata.push(await producer.send(topic, record))
  assert.deepEqual(metadata.map((m) => [m.topic, m.partition, m.offset]), sent.map((_, i) => [topic, 0, i]))
  assert.equal(metadata[4].timestamp, 1_700_000_000_123)
  assert.ok(Math.abs(metadata[0].timestamp - Date.now()) < 60_000, `timestamp ${metadata[0].timestamp} is now`)
  await producer.close()

  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
  try {
    const records = await take(consumer, sent.length)
    assert.deepEqual(records.map((r) => r.offset), [0, 1, 2, 3, 4])
    assert.ok(records.every((r) => r.topic === topic && r.partition === 0))
    assert.deepEqual(records[0].key, Buffer.from('user-1'))
    assert.ok(Buffer.isBuffer(records[0].value))
    assert.deepEqual(records[0].value, Buffer.from('buffer value'))
    assert.deepEqual(records[0].headers, { source: Buffer.from('web'), trace: Buffer.from([0, 1, 2]) })
    assert.deepEqual(records[1].key, Buffer.from([1, 2, 3]))
    assert.equal(records[1].value.toString(), 'a string value ✓')
    assert.equal(records[2].key, null)
    assert.equal(records[2].value.toString(), 'array')
    assert.equal(records[3].value, null)
    assert.deepEqual(records[3].headers, { dup: Buffer.from('second'), nullable: null })
    assert.deepEqual(records[4].value, Buffer.alloc(0))
    assert.equal(records[4].timestamp, 1_700_000_000_123)
    assert.deepEqual(records.map((r) => r.timestamp).slice(0, 4), metadata.map((m) => m.timestamp).slice(0, 4))
  } finally {
    await consumer.close()
  }
})

test('sendMany, concurrent sends and explicit partitions keep per-partition order', async () => {
  const topic = uniqueTopic('many')
  await client.createTopic(topic, { partitions: 4 })
  const producer = client.producer({ lingerMs: 2 })
  const many = Array.from({ length: 2000 }, (_, i) => ({ key: `key-${i % 10}`, value: `many-${i}` }))
  const metadata = await producer.sendMany(topic, many)
  assert.equal(metadata.length, many.length)
  // Same key, same partition, increasing offsets.
  const byKey = new Map()
  metadata.forEach((m, i) => {
    const key = `key-${i % 10}`
    const previous = byKey.get(key)
    if (previous !== undefined) {
      assert.equal(m.partition, previous.partition, key)
      assert.ok(m.offset > previous.offset, `${key} offsets increase`)
    }
    byKey.set(key, m)
  })
  const pinned = await Promise.all(Array.from({ length: 100 }, (_, i) => producer.send(topic, { value: `p${i}`, partition: 3 })))
  assert.ok(pinned.every((m) => m.partition === 3))
  await producer.flush()
  await producer.close()

  const consumer = client.consumer({ partitions: [0, 1, 2, 3].map((partition) => ({ topic, partition })), start: 'earliest' })
  try {
    const records = await take(consumer, many.length + pinned.length)
    const values = new Set(records.map((r) => r.value.toString()))
    assert.equal(values.size, many.length + pinned.length, 'each record once')
    const positions = new Map()
    for (const r of records) {
      const last = positions.get(r.partition) ?? -1
      assert.equal(r.offset, last + 1, `partition ${r.partition} in order`)
      positions.set(r.partition, r.offset)
    }
  } finally {
    await consumer.close()
  }
})
