// Builds every example in examples/ into ../../target/wasm/as/<name>.wasm with the library's
// settings: no imports but ketch.log (aborts go to the library's handler), memory exported.
import { readdirSync, mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.resolve(here, "../../target/wasm/as");
mkdirSync(out, { recursive: true });
const asc = path.join(here, "node_modules/.bin/asc");
for (const file of readdirSync(path.join(here, "examples")).filter((f) => f.endsWith(".ts"))) {
  const name = file.replace(/\.ts$/, "").replaceAll("-", "_");
  const target = path.join(out, `${name}.wasm`);
  execFileSync(asc, [
    path.join("examples", file),
    "--outFile", target,
    "--optimizeLevel", "3",
    "--shrinkLevel", "0",
    "--runtime", "incremental",
    "--use", "abort=assembly/index/ketchAbort",
    "--noAssert",
  ], { cwd: here, stdio: "inherit" });
  console.log(`built ${target}`);
}
