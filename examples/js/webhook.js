// Webhook payload validation in JavaScript: `webhooks.validate_payload` checks an incoming
// webhook against the event schema it claims, verifies its HMAC-SHA256 signature over the raw
// body, and returns the normalised event, or fails with InvalidPayload saying every problem.
//
// Build: node sdk-js/build.mjs examples/js/webhook.js -o modules/webhook.wasm
// Run:   celeriac run webhooks.validate_payload --modules modules \
//          --kwargs '{"body": "{\"type\":\"ping\",\"id\":\"e1\",\"created\":1}", "signature": "..."}'

import { task, current } from 'celeriac-task';

export class InvalidPayload extends Error {}

// Each event type: its required fields and their JSON types.
const SCHEMAS = {
  ping: { id: 'string', created: 'number' },
  'message.created': { id: 'string', created: 'number', channel: 'string', text: 'string' },
  'message.deleted': { id: 'string', created: 'number', channel: 'string', message_id: 'string' },
  'member.joined': { id: 'string', created: 'number', channel: 'string', user: 'object' },
};
const MAX_TEXT = 40_000;

// SHA-256 (FIPS 180-4) in plain JS: the sandbox has no crypto.subtle.
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

export function sha256(bytes) {
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const padded = new Uint8Array(((bytes.length + 9 + 63) >> 6) << 6);
  padded.set(bytes);
  padded[bytes.length] = 0x80;
  const bits = bytes.length * 8;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bits / 2 ** 32));
  view.setUint32(padded.length - 4, bits >>> 0);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + i * 4);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      hh = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  const out = new Uint8Array(32);
  const outView = new DataView(out.buffer);
  h.forEach((v, i) => outView.setUint32(i * 4, v));
  return out;
}

export function hmacSha256(key, message) {
  let k = key.length > 64 ? sha256(key) : key;
  const block = new Uint8Array(64);
  block.set(k);
  const inner = new Uint8Array(64 + message.length);
  const outer = new Uint8Array(64 + 32);
  for (let i = 0; i < 64; i++) {
    inner[i] = block[i] ^ 0x36;
    outer[i] = block[i] ^ 0x5c;
  }
  inner.set(message, 64);
  outer.set(sha256(inner), 64);
  return sha256(outer);
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

// Compares in time independent of where the strings differ.
function sameText(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

function typeOf(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  return typeof v;
}

export function validate(body, signature, secret) {
  const problems = [];
  const raw = new TextEncoder().encode(body);
  if (secret !== undefined) {
    const expected = 'sha256=' + hex(hmacSha256(new TextEncoder().encode(secret), raw));
    if (typeof signature !== 'string' || !sameText(signature, expected)) {
      throw new InvalidPayload('signature does not match the body');
    }
  }
  let event;
  try {
    event = JSON.parse(body);
  } catch (e) {
    throw new InvalidPayload(`body is not JSON: ${e.message}`);
  }
  if (typeOf(event) !== 'object') throw new InvalidPayload('body must be a JSON object');
  const schema = SCHEMAS[event.type];
  if (!schema) {
    throw new InvalidPayload(`unknown event type ${JSON.stringify(event.type)}; expected one of ` +
      Object.keys(SCHEMAS).join(', '));
  }
  for (const [field, want] of Object.entries(schema)) {
    const got = typeOf(event[field]);
    if (got === 'undefined') problems.push(`${field} is missing`);
    else if (got !== want) problems.push(`${field} must be ${want}, got ${got}`);
  }
  if (typeof event.text === 'string' && event.text.length > MAX_TEXT) {
    problems.push(`text is ${event.text.length} characters, over ${MAX_TEXT}`);
  }
  if (problems.length) throw new InvalidPayload(`${event.type}: ${problems.join('; ')}`);
  const normalised = { type: event.type };
  for (const field of Object.keys(schema)) normalised[field] = event[field];
  normalised.created = new Date(event.created * 1000).toISOString();
  return normalised;
}

task(
  {
    name: 'webhooks.validate_payload',
    queue: 'webhooks',
    maxRetries: 0,
    description: 'checks a webhook body against its event schema and HMAC signature',
    params: ['body', 'signature', 'secret'],
  },
  function validatePayload(body, signature, secret) {
    if (typeof body !== 'string') throw new TypeError('body must be the raw JSON text');
    const event = validate(body, signature, secret);
    current().info(`valid ${event.type} event ${event.id}`);
    return event;
  },
);

export { describe, run } from 'celeriac-task';
