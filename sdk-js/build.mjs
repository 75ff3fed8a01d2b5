#!/usr/bin/env node
// celeriac-task-build: builds a JavaScript task module into a celeriac task component.
//
//   npx celeriac-task-build app.js -o app.wasm
//
// 1. rolldown bundles the module with everything it imports (this SDK and any pure-JS npm
//    package) into one ES module; the celeriac:task imports stay imports of the component.
// 2. componentize-js builds it against the vendored WIT, with `http` and `fetch-event` off:
//    celeriac grants no network, and a component importing wasi:http would not load.
// Everything a task uses must be imported at the top level: the engine is snapshotted after
// the module runs, as with componentize-py.

import { componentize } from '@bytecodealliance/componentize-js';
import { rolldown } from 'rolldown';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const WIT = join(HERE, 'wit');

function usage(message) {
  if (message) console.error(`celeriac-task-build: ${message}`);
  console.error('usage: celeriac-task-build <module.js> [-o <component.wasm>]');
  process.exit(2);
}

const argv = process.argv.slice(2);
let source;
let output;
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '-o' || argv[i] === '--output') output = argv[++i];
  else if (argv[i] === '-h' || argv[i] === '--help') usage();
  else if (!source) source = argv[i];
  else usage(`unexpected argument ${argv[i]}`);
}
if (!source) usage('no module given');
output ??= source.replace(/\.m?js$/, '') + '.wasm';

const work = await mkdtemp(join(tmpdir(), 'celeriac-task-'));
try {
  const bundle = await rolldown({
    input: resolve(source),
    external: (id) => id.startsWith('celeriac:task/'),
    platform: 'neutral',
    // The task module gets this build tool's own SDK, wherever the module lives, so the
    // runtime library always matches the WIT it is built against.
    resolve: { alias: { 'celeriac-task': join(HERE, 'index.js') } },
    logLevel: 'warn',
  });
  const bundled = join(work, 'task.js');
  await bundle.write({ file: bundled, format: 'esm' });
  await bundle.close();
  const { component } = await componentize({
    sourcePath: bundled,
    witPath: WIT,
    worldName: 'task',
    disableFeatures: ['http', 'fetch-event'],
  });
  await writeFile(output, component);
} catch (e) {
  console.error(`celeriac-task-build: ${source}: ${e.message ?? e}`);
  process.exitCode = 1;
} finally {
  await rm(work, { recursive: true, force: true });
}
