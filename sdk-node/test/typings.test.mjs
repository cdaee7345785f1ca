// The typings compile under `tsc --strict` for a TypeScript program and a plain ES module,
// and the ES module runs against a real broker (so `import` works, not only `require`).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdirSync, symlinkSync, existsSync, rmSync } from 'node:fs'
import { join } from 'node:path'

import { sdkDir, startBroker, uniqueTopic } from './broker.mjs'

const run = promisify(execFile)
const fixtures = join(sdkDir, 'test', 'fixtures')
let broker
before(async () => {
  const modules = join(fixtures, 'node_modules')
  mkdirSync(modules, { recursive: true })
  if (!existsSync(join(modules, 'ketch'))) symlinkSync(sdkDir, join(modules, 'ketch'), 'dir')
  broker = await startBroker()
})
after(async () => {
  await broker?.stop()
  rmSync(join(fixtures, 'node_modules'), { recursive: true, force: true })
})

test('tsc --strict accepts the TypeScript and the plain ESM sample', { timeout: 120_000 }, async () => {
  const tsc = join(sdkDir, 'node_modules', 'typescript', 'bin', 'tsc')
  const args = ['--strict', '--noEmit', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022',
    '--types', 'node', '--typeRoots', join(sdkDir, 'node_modules', '@types'),
    '--allowJs', '--checkJs', join(fixtures, 'sample.mts'), join(fixtures, 'sample.mjs')]
  const result = await run(process.execPath, [tsc, ...args], { cwd: fixtures }).catch((error) => error)
  assert.equal(result.code ?? 0, 0, `${result.stdout}${result.stderr}`)
})

test('tsc --strict rejects a misuse (the typings are not any)', { timeout: 120_000 }, async () => {
  const tsc = join(sdkDir, 'node_modules', 'typescript', 'bin', 'tsc')
  const bad = join(fixtures, 'misuse.mts')
  const { writeFileSync } = await import('node:fs')
  writeFileSync(bad, "import { Client } from 'ketch'\nconst c = await Client.connect({ bootstrap: 1 })\nc.producer({ acks: 'most' })\nawait c.addAcls({ principal: 'a', operation: 'fly', topic: 't' })\n")
  try {
    const result = await run(process.execPath, [tsc, '--strict', '--noEmit', '--module', 'nodenext', '--moduleResolution', 'nodenext',
      '--target', 'es2022', '--types', 'node', '--typeRoots', join(sdkDir, 'node_modules', '@types'), bad], { cwd: fixtures }).catch((error) => error)
    assert.notEqual(result.code ?? 0, 0, 'tsc accepted a wrong option type')
    assert.match(result.stdout, /misuse\.mts\(2,\d+\).*'number' is not assignable/)
    assert.match(result.stdout, /misuse\.mts\(3,\d+\).*"most"/)
    assert.match(result.stdout, /misuse\.mts\(4,\d+\)/)
  } finally {
    rmSync(bad, { force: true })
  }
})

test('the plain ESM sample runs', { timeout: 60_000 }, async () => {
  const topic = uniqueTopic('esm')
  const { stdout } = await run(process.execPath, [join(fixtures, 'sample.mjs'), broker.bootstrap, broker.caCert, topic], { timeout: 30_000 })
  assert.match(stdout, /record 0 user-1 from esm esm/)
  assert.match(stdout, /error unknown_topic/)
})
