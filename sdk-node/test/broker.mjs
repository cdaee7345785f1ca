// Starts a real `ketch serve` on an ephemeral 127.0.0.1 port for the tests, and stops exactly
// that process (by PID). The binary is $KETCH_BIN or the workspace's target/debug/ketch.
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, openSync, closeSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

export const sdkDir = resolve(fileURLToPath(new URL('..', import.meta.url)))
export const BROKER_READY_TIMEOUT_MS = 30_000

export function ketchBin() {
  return process.env.KETCH_BIN ?? resolve(sdkDir, '..', 'target', 'debug', 'ketch')
}

/** Starts a broker; resolves to { bootstrap, caCert, pid, stop() }. */
export async function startBroker(extraArgs = []) {
  const bin = ketchBin()
  if (!existsSync(bin)) throw new Error(`${bin} does not exist: run \`cargo build --bins\` or set KETCH_BIN`)
  const dataDir = mkdtempSync(join(tmpdir(), 'ketch-node-test-'))
  const logPath = join(dataDir, 'broker.log')
  const log = openSync(logPath, 'a')
  const child = spawn(bin, ['serve', '--data-dir', dataDir, '--listen', '127.0.0.1:0', ...extraArgs], {
    stdio: ['ignore', 'pipe', log],
    env: { ...process.env, KETCH_LOG: process.env.KETCH_LOG ?? 'warn' },
  })
  closeSync(log)
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((done) => child.once('exit', done))
      child.kill('SIGKILL')
      await exited
    }
    rmSync(dataDir, { recursive: true, force: true })
  }
  const ready = await new Promise((done, fail) => {
    let buffered = ''
    const timer = setTimeout(() => fail(new Error(`broker not ready in ${BROKER_READY_TIMEOUT_MS} ms`)), BROKER_READY_TIMEOUT_MS)
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (text) => {
      buffered += text
      const line = buffered.split('\n').find((l) => l.startsWith('ketch ready '))
      if (line !== undefined) {
        clearTimeout(timer)
        done(line)
      }
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      fail(new Error(`broker exited with ${code}: ${readFileSync(logPath, 'utf8')}`))
    })
  }).catch(async (error) => {
    await stop()
    throw error
  })
  // Keep draining stdout so the broker never blocks on a full pipe.
  child.stdout.resume()
  const field = (name) => ready.split(/\s+/).find((f) => f.startsWith(`${name}=`))?.slice(name.length + 1)
  const bootstrap = field('listen')
  const caCert = field('ca')
  if (!bootstrap || !caCert) {
    await stop()
    throw new Error(`ready line without listen= or ca=: ${ready}`)
  }
  return { bootstrap, caCert, pid: child.pid, dataDir, stop, log: () => readFileSync(logPath, 'utf8') }
}

let counter = 0
/** A topic name no other test uses. */
export function uniqueTopic(prefix = 't') {
  counter += 1
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${counter}`
}

/** Resolves `promise`, or rejects after `ms` with `what` (every wait in the tests is bounded). */
export function within(ms, what, promise) {
  let timer
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`${what}: not within ${ms} ms`)), ms)
    }),
  ])
}

/** Reads `count` records from a consumer (bounded in time). */
export async function take(consumer, count, ms = 30_000, what = `${count} records`) {
  const records = []
  if (count === 0) return records
  await within(ms, what, (async () => {
    for await (const record of consumer) {
      records.push(record)
      if (records.length >= count) break
    }
  })())
  return records
}
