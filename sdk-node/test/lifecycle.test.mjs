// The process exits by itself: after closing everything, and with a forgotten client too.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdirSync, symlinkSync, rmSync, existsSync } from 'node:fs'
import { join } from 'node:path'

import { Client } from '../dist/index.js'
import { sdkDir, startBroker, uniqueTopic, within } from './broker.mjs'

const EXIT_TIMEOUT_MS = 30_000

let broker
let client
before(async () => {
  broker = await startBroker()
  client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert })
  // Let the fixture `import 'ketch'` as a user would: node_modules/ketch -> this package.
  const modules = join(sdkDir, 'test', 'fixtures', 'node_modules')
  mkdirSync(modules, { recursive: true })
  if (!existsSync(join(modules, 'ketch'))) symlinkSync(sdkDir, join(modules, 'ketch'), 'dir')
})
after(async () => {
  await client?.close()
  await broker?.stop()
  rmSync(join(sdkDir, 'test', 'fixtures', 'node_modules'), { recursive: true, force: true })
})

function runFixture(mode, topic) {
  const child = spawn(process.execPath, [join(sdkDir, 'test', 'fixtures', 'exit-clean.mjs'), broker.bootstrap, broker.caCert, topic, mode], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let output = ''
  child.stdout.on('data', (d) => { output += d })
  child.stderr.on('data', (d) => { output += d })
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  return within(EXIT_TIMEOUT_MS, `the ${mode} fixture exits by itself`, exited)
    .then((status) => ({ ...status, output }))
    .catch((error) => {
      child.kill('SIGKILL')
      throw new Error(`${error.message}; output so far: ${output}`)
    })
}

test('the process exits by itself after client.close()', async () => {
  const topic = uniqueTopic('exit')
  await client.createTopic(topic)
  const { code, output } = await runFixture('close', topic)
  assert.equal(code, 0, output)
  assert.match(output, /done close/)
})

test('a forgotten client (nothing closed) does not keep the process alive', async () => {
  const topic = uniqueTopic('forgotten')
  await client.createTopic(topic)
  const { code, output } = await runFixture('forget', topic)
  assert.equal(code, 0, output)
  assert.match(output, /done forget/)
})

test('break out of for await keeps read-ahead records for the next loop', async () => {
  const topic = uniqueTopic('break')
  await client.createTopic(topic)
  const producer = client.producer({ lingerMs: 1 })
  await producer.sendMany(topic, Array.from({ length: 30 }, (_, i) => ({ value: `b${i}` })))
  await producer.close()
  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
  try {
    const offsets = []
    await within(20_000, 'three loops', (async () => {
      for (let loop = 0; loop < 3; loop++) {
        for await (const record of consumer) {
          offsets.push(record.offset)
          if (offsets.length % 10 === 0) break
        }
      }
    })())
    assert.deepEqual(offsets, Array.from({ length: 30 }, (_, i) => i))
  } finally {
    await consumer.close()
  }
})

test('the event loop keeps turning while sends wait for buffer space and receives wait for records', async () => {
  const { monitorEventLoopDelay } = await import('node:perf_hooks')
  const topic = uniqueTopic('loop')
  await client.createTopic(topic)
  // A buffer of 256 KiB for 16 MiB of records: most of the call waits for deliveries to
  // free space, on the core's runtime.
  const producer = client.producer({ bufferBytesMax: 256 * 1024, batchBytesMax: 64 * 1024, lingerMs: 1 })
  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'latest' })
  const waiting = consumer.recv() // pending on the runtime the whole time
  const delay = monitorEventLoopDelay({ resolution: 5 })
  let ticks = 0
  const ticker = setInterval(() => { ticks += 1 }, 10)
  try {
    const value = Buffer.alloc(1024, 1)
    const records = Array.from({ length: 16 * 1024 }, () => ({ value }))
    delay.enable()
    const started = performance.now()
    await within(60_000, 'sendMany through a small buffer', producer.sendMany(topic, records))
    const elapsed = performance.now() - started
    delay.disable()
    const maxMs = delay.max / 1e6
    assert.ok(elapsed > 50, `the send took ${elapsed.toFixed(0)} ms: long enough to measure`)
    assert.ok(ticks >= Math.floor(elapsed / 10 / 4), `${ticks} ticks of 10 ms in ${elapsed.toFixed(0)} ms`)
    assert.ok(maxMs < 250, `the event loop stalled for ${maxMs.toFixed(0)} ms`)
  } finally {
    clearInterval(ticker)
    await producer.close()
    await consumer.close()
    await waiting.catch(() => {})
  }
})
