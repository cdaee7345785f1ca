// `npm pack` gives ketch-0.1.0.tgz, which installs into a fresh project with
// `npm install ./ketch-0.1.0.tgz` and works there with both `require` and `import`.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { sdkDir, startBroker, uniqueTopic } from './broker.mjs'

const run = promisify(execFile)
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
let broker
let project
let tarball
before(async () => {
  broker = await startBroker()
  project = mkdtempSync(join(tmpdir(), 'ketch-node-pack-'))
})
after(async () => {
  await broker?.stop()
  if (project) rmSync(project, { recursive: true, force: true })
  if (tarball) rmSync(tarball, { force: true })
})

test('the packed tarball installs and runs in a fresh project', { timeout: 240_000 }, async () => {
  const { stdout: packed } = await run(npm, ['pack', '--pack-destination', project, '--json'], { cwd: sdkDir, maxBuffer: 1 << 24 })
  const [{ filename, files }] = JSON.parse(packed)
  assert.equal(filename, 'ketch-0.1.0.tgz')
  tarball = join(project, filename)
  const paths = files.map((f) => f.path)
  for (const expected of ['package.json', 'dist/index.js', 'dist/index.mjs', 'dist/index.d.ts', 'native/index.js', 'native/index.d.ts']) {
    assert.ok(paths.includes(expected), `${expected} is in the tarball`)
  }
  assert.ok(paths.some((p) => /^native\/ketch\..+\.node$/.test(p)), 'the addon is in the tarball')
  assert.ok(!paths.some((p) => p.startsWith('src/') || p.startsWith('test/') || p.startsWith('lib/')), 'only what users need')

  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'fresh', version: '1.0.0', private: true }))
  await run(npm, ['install', '--no-audit', '--no-fund', '--prefer-offline', `./${filename}`], { cwd: project, timeout: 180_000 })
  assert.ok(existsSync(join(project, 'node_modules', 'ketch', 'package.json')))

  const topic = uniqueTopic('packed')
  writeFileSync(join(project, 'cjs.cjs'), `
const { Client, TopicNotFoundError } = require('ketch')
;(async () => {
  const [bootstrap, caCert, topic] = process.argv.slice(2)
  const client = await Client.connect({ bootstrap, caCert })
  await client.createTopic(topic)
  const producer = client.producer()
  const md = await producer.send(topic, { value: 'from the tarball' })
  const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
  const record = await consumer.recv()
  await consumer.close()
  const missing = await producer.send(topic + '-missing', { value: 'x' }).catch((e) => e)
  await producer.close()
  console.log('cjs', md.offset, record.value.toString(), missing instanceof TopicNotFoundError)
  await client.close()
})()
`)
  writeFileSync(join(project, 'esm.mjs'), `
import { Client } from 'ketch'
import ketch from 'ketch'
const [bootstrap, caCert, topic] = process.argv.slice(2)
const client = await Client.connect({ bootstrap, caCert })
const consumer = client.consumer({ partitions: [{ topic, partition: 0 }], start: 'earliest' })
const record = await consumer.recv()
console.log('esm', record.value.toString(), ketch.Client === Client)
await client.close()
`)
  const cjs = await run(process.execPath, ['cjs.cjs', broker.bootstrap, broker.caCert, topic], { cwd: project, timeout: 30_000 })
  assert.equal(cjs.stdout.trim(), 'cjs 0 from the tarball true')
  const esm = await run(process.execPath, ['esm.mjs', broker.bootstrap, broker.caCert, topic], { cwd: project, timeout: 30_000 })
  assert.equal(esm.stdout.trim(), 'esm from the tarball true')
})
