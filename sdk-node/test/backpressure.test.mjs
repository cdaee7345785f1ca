// A slow consumer of a large topic keeps its memory bounded: the loop pulls from the core's
// bounded queue, and while it is full QUIC flow control holds the broker back.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { setTimeout as sleep } from 'node:timers/promises'

import { Client } from '../dist/index.js'
import { startBroker, uniqueTopic, within } from './broker.mjs'

const RECORD_BYTES = 4 * 1024
const RECORDS = 40_000 // 160 MiB in the topic
const SLOW_RECORDS = 600
const RSS_GROWTH_BYTES_MAX = 64 * 1024 * 1024

let broker
let client
before(async () => {
  broker = await startBroker(['--fsync', 'never'])
  client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert })
})
after(async () => {
  await client?.close()
  await broker?.stop()
})

test(`a slow consumer of a ${(RECORDS * RECORD_BYTES) >> 20} MiB topic stays within ${RSS_GROWTH_BYTES_MAX >> 20} MiB of RSS growth`, { timeout: 240_000 }, async () => {
  const topic = uniqueTopic('backpressure')
  await client.createTopic(topic, { partitions: 2 })
  const producer = client.producer({ lingerMs: 5, acks: 'leader' })
  const value = Buffer.alloc(RECORD_BYTES, 7)
  const chunk = Array.from({ length: 1000 }, () => ({ value }))
  for (let sent = 0; sent < RECORDS; sent += chunk.length) await producer.sendMany(topic, chunk)
  await producer.close()

  const consumer = client.consumer({
    partitions: [0, 1].map((partition) => ({ topic, partition })),
    start: 'earliest',
    prefetchChunksMax: 4,
    partitionFetchBytesMax: 256 * 1024,
    maxBatchRecords: 32,
  })
  try {
    let read = 0
    let baseline
    let peak = 0
    await within(120_000, `${SLOW_RECORDS} records read slowly`, (async () => {
      for await (const record of consumer) {
        assert.equal(record.value.length, RECORD_BYTES)
        read += 1
        if (read === 50) baseline = process.memoryUsage().rss
        if (read > 50) peak = Math.max(peak, process.memoryUsage().rss)
        await sleep(5) // the slow loop body
        if (read === SLOW_RECORDS) break
      }
    })())
    const growth = peak - baseline
    console.log(`rss baseline ${(baseline / 2 ** 20).toFixed(1)} MiB, growth ${(growth / 2 ** 20).toFixed(1)} MiB over ${SLOW_RECORDS} slow records`)
    assert.ok(growth < RSS_GROWTH_BYTES_MAX, `RSS grew by ${(growth / 2 ** 20).toFixed(1)} MiB while the topic holds ${(RECORDS * RECORD_BYTES) >> 20} MiB`)
  } finally {
    await consumer.close()
  }
})
