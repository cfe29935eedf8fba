// Builds agent.js into an agent component: `node build.mjs OUT.wasm`
// (after `npm ci` in this directory).
//
// Calls the `componentize` API with absolute paths: the `jco componentize`
// CLI failed here with "failed to get path metadata".
import { writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2];
if (!out || process.argv.length > 3) {
  console.error('usage: node build.mjs OUT.wasm');
  process.exit(2);
}
const { component } = await componentize({
  sourcePath: resolve(here, 'agent.js'),
  witPath: resolve(here, '../../wit'),
  worldName: 'supervised-agent',
  // The host links WASI 0.2's CLI interfaces (clocks, random, stdio,
  // filesystem) but not wasi:http: without these two the component imports
  // wasi:http/types and cannot be linked.
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(resolve(out), component);
console.error(`wrote ${resolve(out)} (${component.length} bytes)`);
