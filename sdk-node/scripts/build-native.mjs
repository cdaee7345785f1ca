// Builds the native addon with a plain `cargo build -p ketch-node` into the workspace's own
// target dir (target/debug, or target/release with --release), then writes native/index.js and
// native/index.d.ts with @napi-rs/cli's own generators and copies the library to
// native/ketch.<platform>.node — what `napi build --platform --dts index.d.ts --js index.js
// --output-dir native` does, without its `--target <host triple>`: napi-cli 3 always passes
// one, which puts the build in target/<triple>/ and so compiles every dependency a second time
// next to the workspace build CI has already made in target/debug.
//
// The type definitions come from napi-derive, which writes them while it expands the crate
// into $NAPI_TYPE_DEF_TMP_FOLDER; napi-build's build script reruns when that variable (or
// NAPI_FORCE_BUILD_KETCH_NODE) changes, so only this crate is recompiled to produce them.
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

import { generateTypeDef, parseTriple, writeJsBinding } from '@napi-rs/cli'

const CRATE = 'ketch-node'
const sdkDir = resolve(fileURLToPath(new URL('..', import.meta.url)))
const outputDir = join(sdkDir, 'native')
const release = process.argv.includes('--release')
const profile = release ? 'release' : 'debug'

function run(command, args, env = process.env) {
  const result = spawnSync(command, args, { cwd: sdkDir, env, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' })
  if (result.error) throw result.error
  if (result.status !== 0) {
    process.stderr.write(result.stdout ?? '')
    throw new Error(`${command} ${args.join(' ')} exited with ${result.status}`)
  }
  return result.stdout
}

const metadata = JSON.parse(run('cargo', ['metadata', '--format-version', '1', '--no-deps']))
const targetDir = metadata.target_directory
const pkg = metadata.packages.find((p) => p.name === CRATE)
if (pkg === undefined) throw new Error(`no package ${CRATE} in the workspace`)
const host = /^host: (.+)$/m.exec(run('rustc', ['-vV']))?.[1]
if (host === undefined) throw new Error('rustc -vV names no host triple')
const target = parseTriple(host)

// One folder per profile, kept between builds: a fresh crate keeps the definitions its last
// compilation wrote there. If they are gone, force the crate to compile again.
const typeDefDir = join(targetDir, 'napi-rs', `${CRATE}-typedefs-${profile}`)
mkdirSync(typeDefDir, { recursive: true })
// The force variable keeps its value between builds (a stamp file), so that setting it once
// does not make the next build recompile again for its absence.
const stamp = `${typeDefDir}.force-build` // outside: every file in typeDefDir is read as definitions
if (!existsSync(join(typeDefDir, CRATE)) || !existsSync(stamp)) writeFileSync(stamp, String(Date.now()))
const env = {
  ...process.env,
  NAPI_TYPE_DEF_TMP_FOLDER: typeDefDir,
  NAPI_FORCE_BUILD_KETCH_NODE: readFileSync(stamp, 'utf8'),
}
const started = Date.now()
// --workspace: build what `cargo build --workspace --all-targets` builds (CI's build, already
// done by then), so dependencies keep the features that build unified and are not compiled a
// second time with the narrower set `-p ketch-node` alone resolves; only this crate recompiles.
const workspace = process.argv.includes('--workspace')
const cargoArgs = [
  'build',
  '--locked',
  ...(workspace ? ['--workspace', '--all-targets'] : ['-p', CRATE]),
  ...(release ? ['--release'] : []),
]
const built = spawnSync('cargo', cargoArgs, { cwd: sdkDir, env, stdio: 'inherit' })
if (built.error) throw built.error
if (built.status !== 0) process.exit(built.status ?? 1)

const libName = pkg.targets.find((t) => t.kind.includes('cdylib')).name.replace(/-/g, '_')
const library = { darwin: `lib${libName}.dylib`, win32: `${libName}.dll` }[target.platform] ?? `lib${libName}.so`
const packageJson = JSON.parse(readFileSync(join(sdkDir, 'package.json'), 'utf8'))
const binaryName = packageJson.napi?.binaryName ?? 'index'
mkdirSync(outputDir, { recursive: true })
// Copy then rename: a running process keeps its mapping of the old file intact.
const node = join(outputDir, `${binaryName}.${target.platformArchABI}.node`)
copyFileSync(join(targetDir, profile, library), `${node}.tmp`)
renameSync(`${node}.tmp`, node)

const { exports, dts } = await generateTypeDef({ typeDefDir, cwd: sdkDir, declareBindingTarget: (names) => names.length > 0 })
if (exports.length === 0) throw new Error(`no type definitions in ${typeDefDir}: the crate did not write any`)
writeFileSync(join(outputDir, 'index.d.ts'), dts)
await writeJsBinding({
  platform: true,
  idents: exports,
  jsBinding: 'index.js',
  binaryName,
  packageName: packageJson.name,
  version: packageJson.version,
  outputDir,
})
console.log(`native/${binaryName}.${target.platformArchABI}.node (${profile}) from ${join(targetDir, profile)} in ${((Date.now() - started) / 1000).toFixed(1)} s`)
