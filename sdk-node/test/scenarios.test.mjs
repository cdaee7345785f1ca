// The shared behaviour scenarios (tests/scenarios/*.toml, format in its README.md) run
// through the Node SDK, one fresh broker per scenario.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { parse } from 'smol-toml'

import { Client } from '../dist/index.js'
import { sdkDir, startBroker, within } from './broker.mjs'

const STEP_TIMEOUT_MS = 30_000
const dir = process.env.KETCH_SCENARIOS_DIR ?? resolve(sdkDir, '..', 'tests', 'scenarios')
const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.toml')).sort() : []

/** The fields each step kind may have (an unknown key is an error, so a typo cannot skip a check). */
const FIELDS = {
  create_topic: ['topic', 'partitions'],
  delete_topic: ['topic'],
  produce: ['topic', 'records', 'generate', 'expect_error'],
  subscribe: ['consumer', 'group', 'topics', 'auto_commit'],
  assign: ['consumer', 'partitions', 'group'],
  consume: ['consumer', 'count', 'expect', 'check_key_order', 'expect_error'],
  consume_group: ['consumers', 'count'],
  expect_nothing: ['consumer', 'wait_ms'],
  commit: ['consumer'],
  seek: ['consumer', 'topic', 'partition', 'offset', 'timestamp'],
  close: ['consumer'],
  wait_assignment: ['consumer', 'partitions', 'within_ms'],
}
const RECORD_FIELDS = ['key', 'value', 'value_bytes', 'headers', 'partition', 'timestamp']
const EXPECT_FIELDS = ['key', 'value', 'headers', 'partition', 'offset']

function checkKeys(table, allowed, what) {
  for (const key of Object.keys(table)) assert.ok(allowed.includes(key), `${what}: unknown key ${key}`)
}

function recordToSend(spec) {
  checkKeys(spec, RECORD_FIELDS, 'record')
  return {
    key: spec.key ?? null,
    value: spec.value_bytes !== undefined ? Buffer.alloc(spec.value_bytes, 'x') : spec.value ?? null,
    headers: spec.headers,
    partition: spec.partition,
    timestamp: spec.timestamp,
  }
}

class Runner {
  consumers = new Map()
  /** A receive started by `expect_nothing` that no record answered yet: the next record. */
  pending = new Map()

  constructor(client) {
    this.client = client
  }

  consumer(name) {
    const consumer = this.consumers.get(name)
    assert.ok(consumer, `no consumer named ${name}`)
    return consumer
  }

  recv(name) {
    const pending = this.pending.get(name)
    if (pending !== undefined) {
      this.pending.delete(name)
      return pending
    }
    return this.consumer(name).recv()
  }

  async create_topic(s) { await this.client.createTopic(s.topic, { partitions: s.partitions ?? 1 }) }
  async delete_topic(s) { await this.client.deleteTopic(s.topic) }

  async produce(s) {
    const records = (s.records ?? []).map(recordToSend)
    if (s.generate !== undefined) {
      checkKeys(s.generate, ['count', 'value_prefix', 'key_count'], 'generate')
      for (let i = 0; i < s.generate.count; i++) {
        records.push({
          value: `${s.generate.value_prefix ?? ''}${i}`,
          key: s.generate.key_count === undefined ? null : `k${i % s.generate.key_count}`,
        })
      }
    }
    const producer = this.client.producer()
    try {
      const results = await Promise.allSettled(records.map((record) => producer.send(s.topic, record)))
      await producer.flush()
      results.forEach((result, i) => {
        if (s.expect_error === undefined) {
          assert.equal(result.status, 'fulfilled', `record ${i}: ${result.reason?.message}`)
        } else {
          assert.equal(result.status, 'rejected', `record ${i} should fail with ${s.expect_error}`)
          assert.equal(result.reason.code, s.expect_error, result.reason.message)
        }
      })
    } finally {
      await producer.close()
    }
  }

  subscribe(s) {
    this.consumers.set(s.consumer, this.client.consumer({
      topics: s.topics, group: s.group, start: 'earliest', autoCommit: s.auto_commit ?? false,
    }))
  }

  assign(s) {
    this.consumers.set(s.consumer, this.client.consumer({
      partitions: s.partitions, group: s.group, start: 'earliest', autoCommit: false,
    }))
  }

  async consume(s) {
    if (s.expect_error !== undefined) {
      await assert.rejects(this.recv(s.consumer), (error) => error.code === s.expect_error)
      return
    }
    const expect = s.expect ?? []
    const count = s.count ?? expect.length
    const lastByKey = new Map()
    for (let i = 0; i < count; i++) {
      const record = await this.recv(s.consumer)
      const want = expect[i]
      if (want !== undefined) {
        checkKeys(want, EXPECT_FIELDS, 'expect')
        const where = `record ${i} (offset ${record.offset})`
        if ('key' in want) assert.equal(record.key?.toString() ?? null, want.key, `${where}: key`)
        if ('value' in want) assert.equal(record.value?.toString() ?? null, want.value, `${where}: value`)
        if ('partition' in want) assert.equal(record.partition, want.partition, `${where}: partition`)
        if ('offset' in want) assert.equal(record.offset, want.offset, `${where}: offset`)
        if ('headers' in want) {
          const headers = Object.fromEntries(Object.entries(record.headers).map(([k, v]) => [k, v?.toString() ?? null]))
          assert.deepEqual(headers, { ...want.headers }, `${where}: headers`)
        }
      }
      if (s.check_key_order && record.key !== null) {
        const key = record.key.toString()
        const number = Number(/(\d+)$/.exec(record.value.toString())?.[1])
        const last = lastByKey.get(key)
        assert.ok(last === undefined || number > last, `key ${key}: ${number} after ${last}`)
        lastByKey.set(key, number)
      }
    }
  }

  async consume_group(s) {
    const seen = new Map()
    const perConsumer = new Map(s.consumers.map((name) => [name, 0]))
    let done
    const finished = new Promise((resolve) => { done = resolve })
    const loops = s.consumers.map(async (name) => {
      while (seen.size < s.count) {
        const record = await this.recv(name)
        const id = `${record.topic}/${record.partition}@${record.offset}`
        assert.ok(!seen.has(id), `${id} read by ${seen.get(id)} and ${name}`)
        seen.set(id, name)
        perConsumer.set(name, perConsumer.get(name) + 1)
        if (seen.size === s.count) done()
      }
    })
    await Promise.race([finished, ...loops.map((loop) => loop.then(() => finished))])
    for (const loop of loops) loop.catch(() => {}) // the others wait until their consumer closes
    assert.equal(seen.size, s.count)
    for (const [name, n] of perConsumer) assert.ok(n > 0, `${name} read no record`)
  }

  async expect_nothing(s) {
    const next = this.recv(s.consumer)
    next.catch(() => {})
    let timer
    const quiet = new Promise((resolve) => { timer = setTimeout(() => resolve('quiet'), s.wait_ms) })
    const first = await Promise.race([next.then((record) => record), quiet])
    clearTimeout(timer)
    assert.equal(first, 'quiet', `a record arrived: offset ${first?.offset}`)
    this.pending.set(s.consumer, next)
  }

  async commit(s) { await this.consumer(s.consumer).commit() }

  async seek(s) {
    const to = s.timestamp !== undefined ? { timestamp: s.timestamp } : s.offset
    await this.consumer(s.consumer).seek(s.topic, s.partition, to)
  }

  async close(s) {
    this.pending.delete(s.consumer)
    await this.consumer(s.consumer).close()
  }

  async wait_assignment(s) {
    const consumer = this.consumer(s.consumer)
    const holds = () => consumer.assignment().length === s.partitions
    // Polled as well as checked on events: a 'revoke' handler runs before the core releases
    // the partitions, so the assignment shrinks after the last event.
    let poll
    try {
      await within(s.within_ms, `${s.consumer} holds ${s.partitions} partitions`, new Promise((resolve) => {
        if (holds()) return resolve()
        poll = setInterval(() => holds() && resolve(), 20)
      }))
    } finally {
      clearInterval(poll)
    }
  }

  async closeAll() {
    await Promise.allSettled([...this.consumers.values()].map((c) => c.close()))
  }
}

if (files.length === 0) {
  test('the shared behaviour scenarios', {
    skip: `waits for issue 9: no scenario files in ${dir} yet`,
  }, () => {})
}

for (const file of files) {
  const scenario = parse(readFileSync(join(dir, file), 'utf8'))
  test(`scenario ${file}: ${scenario.name}`, { timeout: 180_000 }, async () => {
    checkKeys(scenario, ['name', 'about', 'step'], file)
    const broker = await startBroker()
    const client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert })
    const runner = new Runner(client)
    try {
      for (const [index, step] of (scenario.step ?? []).entries()) {
        const { do: kind, ...fields } = step
        assert.ok(kind in FIELDS, `step ${index + 1}: unknown step ${kind}`)
        checkKeys(fields, FIELDS[kind], `step ${index + 1} (${kind})`)
        try {
          await within(STEP_TIMEOUT_MS, `step ${index + 1} (${kind})`, Promise.resolve(runner[kind](fields)))
        } catch (error) {
          error.message = `${file} step ${index + 1} (${kind}): ${error.message}`
          throw error
        }
      }
    } finally {
      await runner.closeAll()
      await client.close()
      await broker.stop()
    }
  })
}
