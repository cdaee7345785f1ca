// Produces and consumes 1M 100-byte records through the Node SDK (`send`, `sendMany`,
// `for await`) and through the Rust client (`ketch-bench run`) in the same run, and prints
// records/s for each and the ratios against the targets.
//
//   cargo build --release -p ketch-bench -p ketch-cli --bin ketch --bin ketch-bench   (or -p ketch-broker)
//   (cd sdk-node && npm run build:release && npm run bench)
//
// Environment: KETCH_BIN (broker; default target/release/ketch), KETCH_BENCH_BIN (default
// target/release/ketch-bench), BENCH_RECORDS (default 1000000).
import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { resolve } from 'node:path'
import { promisify } from 'node:util'

import { Client } from '../dist/index.js'
import { sdkDir, startBroker, uniqueTopic } from '../test/broker.mjs'

const RECORDS = Number(process.env.BENCH_RECORDS ?? 1_000_000)
const RECORD_BYTES = 100
const SEND_WINDOW = 10_000 // per-record sends in flight
const SEND_MANY_CHUNK = 10_000
const SEND_MANY_IN_FLIGHT = 4

const release = (name) => resolve(sdkDir, '..', 'target', 'release', name)
process.env.KETCH_BIN ??= release('ketch')
const benchBin = process.env.KETCH_BENCH_BIN ?? release('ketch-bench')

const rate = (count, ms) => (count * 1000) / ms
const fmt = (r) => `${Math.round(r).toLocaleString('en-US')} records/s`

async function rust(workload) {
  if (!existsSync(benchBin)) return undefined
  const { stdout } = await promisify(execFile)(benchBin, ['run', '--system', 'ketch', '--workload', workload,
    '--record-bytes', String(RECORD_BYTES), '--records', String(RECORDS), '--quiet', '--json'], { maxBuffer: 1 << 26 })
  const [measurement] = JSON.parse(stdout).measurements
  return measurement?.records_per_sec
}

async function main() {
  const broker = await startBroker(['--fsync', 'never'])
  const client = await Client.connect({ bootstrap: broker.bootstrap, caCert: broker.caCert })
  const value = Buffer.alloc(RECORD_BYTES, 120)
  const results = {}
  try {
    // Per-record send: many in flight, as an app that does not await each record would.
    const sendTopic = uniqueTopic('bench-send')
    await client.createTopic(sendTopic, { partitions: 1 })
    let producer = client.producer({ acks: 'leader', lingerMs: 5 })
    let started = performance.now()
    for (let sent = 0; sent < RECORDS; sent += SEND_WINDOW) {
      const window = []
      for (let i = 0; i < SEND_WINDOW && sent + i < RECORDS; i++) window.push(producer.send(sendTopic, { value }))
      await Promise.all(window)
    }
    results.send = rate(RECORDS, performance.now() - started)
    await producer.close()

    // sendMany: one napi call per chunk.
    const manyTopic = uniqueTopic('bench-many')
    await client.createTopic(manyTopic, { partitions: 1 })
    producer = client.producer({ acks: 'leader', lingerMs: 5 })
    const chunk = Array.from({ length: SEND_MANY_CHUNK }, () => ({ value }))
    started = performance.now()
    const inFlight = new Set()
    for (let sent = 0; sent < RECORDS; sent += SEND_MANY_CHUNK) {
      const p = producer.sendMany(manyTopic, chunk.slice(0, Math.min(SEND_MANY_CHUNK, RECORDS - sent)))
      inFlight.add(p)
      void p.then(() => inFlight.delete(p))
      if (inFlight.size >= SEND_MANY_IN_FLIGHT) await Promise.race(inFlight)
    }
    await Promise.all(inFlight)
    results.sendMany = rate(RECORDS, performance.now() - started)
    await producer.close()

    // for await consume of the sendMany topic.
    const consumer = client.consumer({ partitions: [{ topic: manyTopic, partition: 0 }], start: 'earliest' })
    started = performance.now()
    let read = 0
    for await (const record of consumer) {
      if (record.value.length !== RECORD_BYTES) throw new Error('wrong record')
      if (++read === RECORDS) break
    }
    results.consume = rate(RECORDS, performance.now() - started)
    await consumer.close()
  } finally {
    await client.close()
    await broker.stop()
  }
  const rustProduce = await rust('produce')
  const rustConsume = await rust('consume')
  const line = (name, value, base, target) => {
    const ratio = base === undefined ? '' : `  ${((value / base) * 100).toFixed(0)}% of Rust`
    console.log(`${name.padEnd(22)} ${fmt(value).padStart(22)}${ratio}  (target ${target})`)
  }
  console.log(`${RECORDS.toLocaleString('en-US')} records of ${RECORD_BYTES} B, acks=leader, fsync never, one partition`)
  line('node send', results.send, rustProduce, '>= 200,000 records/s')
  line('node sendMany', results.sendMany, rustProduce, '>= 50% of Rust')
  line('node for await', results.consume, rustConsume, '>= 50% of Rust')
  if (rustProduce === undefined) console.log(`rust client: ${benchBin} not built, no ratios`)
  else {
    console.log(`${'rust produce'.padEnd(22)} ${fmt(rustProduce).padStart(22)}`)
    console.log(`${'rust consume'.padEnd(22)} ${fmt(rustConsume).padStart(22)}`)
  }
}

await main()
