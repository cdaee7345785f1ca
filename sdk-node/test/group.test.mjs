// Consumer groups, commits and seeks against a real broker.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'

import { Client } from '../dist/index.js'
import { startBroker, take, uniqueTopic, within } from './broker.mjs'

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

async function produce(topic, count, prefix = 'r') {
  const producer = client.producer({ lingerMs: 1 })
  try {
    return await producer.sendMany(topic, Array.from({ length: count }, (_, i) => ({ key: `k${i}`, value: `${prefix}${i}` })))
  } finally {
    await producer.close()
  }
}

test('a group of three consumers gets each record once', async () => {
  const topic = uniqueTopic('group3')
  const group = uniqueTopic('g')
  await client.createTopic(topic, { partitions: 6 })
  const count = 600
  const consumers = [0, 1, 2].map(() => client.consumer({ topics: [topic], group, start: 'earliest' }))
  const seen = new Map()
  const assigned = [0, 1, 2].map(() => new Set())
  let grouped
  const formed = new Promise((resolve) => { grouped = resolve })
  const check = () => {
    const sizes = consumers.map((c) => c.assignment().length)
    if (sizes.every((n) => n > 0) && sizes.reduce((a, b) => a + b) === 6) grouped()
  }
  consumers.forEach((consumer, i) => {
    consumer.on('assign', (partitions) => {
      partitions.forEach((p) => assigned[i].add(p.partition))
      check()
    })
    consumer.on('revoke', check)
  })
  // Records arrive once all three members share the six partitions.
  await within(60_000, 'the three members share the partitions', formed)
  await produce(topic, count)
  let allSeen
  const done = new Promise((resolve) => { allSeen = resolve })
  const loops = consumers.map(async (consumer, i) => {
    for await (const record of consumer) {
      const value = record.value.toString()
      assert.equal(seen.has(value), false, `${value} delivered twice (consumers ${seen.get(value)} and ${i})`)
      seen.set(value, i)
      if (seen.size === count) allSeen()
    }
  })
  try {
    await within(60_000, `all ${count} records consumed by the group`, Promise.race([
      done,
      ...loops.map((loop) => loop.then(() => { throw new Error('a loop ended before the group read everything') })),
    ]))
  } finally {
    await Promise.all(consumers.map((c) => c.close()))
  }
  await within(10_000, 'loops end once their consumers close', Promise.all(loops))
  assert.equal(seen.size, count)
  assert.equal(new Set(seen.values()).size, 3, 'every member read records')
  const partitionsAssigned = assigned.map((s) => [...s])
  assert.ok(partitionsAssigned.flat().length >= 6, `assign events cover the partitions: ${JSON.stringify(partitionsAssigned)}`)
})

test('commit and resume: a new member of the group starts after the committed offset', async () => {
  const topic = uniqueTopic('resume')
  const group = uniqueTopic('g')
  await client.createTopic(topic, { partitions: 1 })
  await produce(topic, 100)
  const first = client.consumer({ topics: [topic], group, start: 'earliest', autoCommit: false, maxBatchRecords: 64 })
  try {
    const records = await take(first, 40)
    assert.deepEqual(records.map((r) => r.offset), Array.from({ length: 40 }, (_, i) => i))
    // 40 records were handed out; more were read ahead. Commit covers what the loop saw.
    await first.commit()
  } finally {
    await first.close()
  }
  assert.deepEqual(
    (await client.committedOffsets(group)).map(({ topic: t, partition, offset }) => [t, partition, offset]),
    [[topic, 0, 40]],
  )
  const second = client.consumer({ topics: [topic], group, start: 'earliest', autoCommit: false })
  try {
    const records = await take(second, 60)
    assert.deepEqual(records.map((r) => r.offset), Array.from({ length: 60 }, (_, i) => 40 + i))
  } finally {
    await second.close()
  }
})

test('close with auto-commit commits only what the loop saw, not what was read ahead', async () => {
  const topic = uniqueTopic('autocommit')
  const group = uniqueTopic('g')
  await client.createTopic(topic, { partitions: 1 })
  await produce(topic, 50)
  const consumer = client.consumer({ topics: [topic], group, start: 'earliest', autoCommitIntervalMs: 600_000 })
  try {
    const records = await take(consumer, 10)
    assert.equal(records.at(-1).offset, 9)
  } finally {
    await consumer.close()
  }
  assert.deepEqual((await client.committedOffsets(group)).map((c) => c.offset), [10])
})

test('seek by offset, to the beginning, to the end and by timestamp', async () => {
  const topic = uniqueTopic('seek')
  await client.createTopic(topic, { partitions: 1 })
  const producer = client.producer({ lingerMs: 0 })
  const base = Date.now() - 100_000
  // One batch per record: the broker finds a time in its batches' timestamps.
  for (let i = 0; i < 50; i++) await producer.send(topic, { value: `v${i}`, timestamp: base + i * 1000 })
  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
  try {
    assert.equal((await take(consumer, 5)).at(-1).offset, 4)
    await consumer.seek(topic, 0, 42)
    assert.deepEqual((await take(consumer, 3)).map((r) => r.offset), [42, 43, 44])
    await consumer.seek(topic, 0, 'beginning')
    assert.deepEqual((await take(consumer, 2)).map((r) => r.offset), [0, 1])
    await consumer.seek(topic, 0, { timestamp: base + 30_500 })
    const [atTime] = await take(consumer, 1)
    assert.equal(atTime.offset, 31)
    assert.equal(atTime.timestamp, base + 31_000)
    await consumer.seek(topic, 0, 'end')
    await producer.send(topic, { value: 'after the end' })
    const [next] = await take(consumer, 1)
    assert.deepEqual([next.offset, next.value.toString()], [50, 'after the end'])
    assert.equal(consumer.position(topic, 0), 51)
    assert.deepEqual(consumer.assignment(), [{ topic, partition: 0 }])
  } finally {
    await consumer.close()
    await producer.close()
  }
})

test('manual commits in the revoke handler: members join and leave, every record once', async () => {
  const topic = uniqueTopic('revokecommit')
  const group = uniqueTopic('g')
  await client.createTopic(topic, { partitions: 4 })
  const count = 3000
  await produce(topic, count)
  const seen = new Map()
  const duplicates = []
  const commitErrors = []
  const revokes = []
  let reached = []
  let gate
  let openGate
  const join = async (name) => {
    const joined = member(name)
    members.push(joined)
    await within(60_000, `${name} gets partitions`, new Promise((resolve) => {
      const poll = setInterval(() => {
        if (joined.consumer.assignment().length > 0) {
          clearInterval(poll)
          resolve()
        }
      }, 20)
    }))
    gate = undefined
    openGate()
  }
  const waitFor = (n) => new Promise((resolve) => { reached.push([n, resolve]) })
  const member = (name) => {
    const consumer = client.consumer({ topics: [topic], group, start: 'earliest', autoCommit: false, maxBatchRecords: 8 })
    consumer.on('revoke', async (partitions) => {
      revokes.push([name, partitions.length])
      // The core releases the partitions only after this settles.
      try {
        await consumer.commit()
      } catch (error) {
        commitErrors.push(`${name}: ${error}`)
      }
    })
    const loop = (async () => {
      for await (const record of consumer) {
        const value = record.value.toString()
        if (seen.has(value)) duplicates.push(`${value} (${seen.get(value)}, then ${name})`)
        else seen.set(value, name)
        // At a quarter and at half the loops stop (in the middle of processing) until the next
        // member has partitions: the rebalance happens while records are in flight.
        if ((seen.size === count / 4 || seen.size === count / 2) && gate === undefined) {
          gate = new Promise((resolve) => { openGate = resolve })
        }
        reached = reached.filter(([n, resolve]) => (seen.size >= n ? (resolve(), false) : true))
        while (gate !== undefined) await gate
        await new Promise((resolve) => setTimeout(resolve, 1))
      }
    })()
    return { consumer, loop }
  }
  const a = member('a')
  const members = [a]
  try {
    await within(60_000, 'a reads a quarter', waitFor(count / 4))
    await join('b')
    await within(60_000, 'a and b read half', waitFor(count / 2))
    await join('c')
    await within(60_000, 'three quarters read', waitFor((count * 3) / 4))
    await a.consumer.close()
    await within(60_000, `all ${count} records read`, waitFor(count))
  } finally {
    gate = undefined
    openGate?.()
    await Promise.all(members.map((m) => m.consumer.close()))
  }
  await within(10_000, 'loops end once their consumers close', Promise.all(members.map((m) => m.loop)))
  assert.deepEqual(duplicates, [], 'no record delivered twice')
  assert.deepEqual(commitErrors, [], 'every commit in a revoke handler succeeded')
  assert.equal(seen.size, count)
  // a gave partitions back as b joined (mid-stream, the loops held at a quarter) and as it closed.
  assert.ok(revokes.filter(([name]) => name === 'a').length >= 2, `revokes: ${JSON.stringify(revokes)}`)
  // Each member committed only in its revoke handlers (rebalances and close): together they cover the topic.
  const committed = await client.committedOffsets(group)
  assert.equal(committed.reduce((sum, c) => sum + c.offset, 0), count, JSON.stringify(committed))
})

/** Resolves once `consumer` holds at least one partition (polled, bounded). */
function assigned(consumer, what) {
  return within(60_000, what, new Promise((resolve) => {
    const poll = setInterval(() => {
      if (consumer.assignment().length > 0) {
        clearInterval(poll)
        resolve()
      }
    }, 20)
  }))
}

test('assignmentListenerTimeoutMs bounds how long a revoke handler holds partitions', async () => {
  const topic = uniqueTopic('listenertimeout')
  const group = uniqueTopic('g')
  await client.createTopic(topic, { partitions: 2 })
  const timeoutMs = 1_000
  const a = client.consumer({ topics: [topic], group, start: 'earliest', assignmentListenerTimeoutMs: timeoutMs })
  let revokeStarted
  // A handler that never settles: only the timeout lets the core go on. (Its Promise stays
  // reachable: a collected one would end the wait as well.)
  const stuck = []
  a.on('revoke', () => {
    revokeStarted ??= Date.now()
    const never = new Promise((resolve) => stuck.push(resolve))
    stuck.push(never)
    return never
  })
  await assigned(a, 'a gets partitions')
  assert.equal(a.assignment().length, 2)
  const b = client.consumer({ topics: [topic], group, start: 'earliest' })
  try {
    // With the default (30 s) b would wait that long; here about a second.
    await assigned(b, 'b gets a partition within 60 s')
    const waited = Date.now() - revokeStarted
    assert.ok(revokeStarted !== undefined, 'the revoke handler ran')
    assert.ok(waited >= timeoutMs - 100, `b got a partition ${waited} ms after the revoke began: the core did not wait for the handler`)
    assert.ok(waited < 15_000, `b got a partition only ${waited} ms after the revoke began`)
  } finally {
    await Promise.all([a.close(), b.close()])
    assert.ok(stuck.length > 0)
  }
})
