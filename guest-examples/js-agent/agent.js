// Counter agent in JavaScript: the Rust `echo-agent`'s behaviour, built with
// componentize-js against ../../wit/agent.wit (world `supervised-agent`) by
// build.mjs.
//
// The counter lives in the host's per-agent state (key `count`, a
// little-endian u64 as in the Rust agent), so a restarted instance continues
// where its predecessor stopped.
//
// Messages:
//   count  increments the counter and replies with the new value
//   get    replies with the counter
//   ping   replies `pong`
//   raise  throws an Error: uncaught, the guest traps, the host sees a crash
//   error  throws a string: the binding returns it as `err`, an application
//          error, and the agent keeps running
//   loop   loops forever (stopped by fuel or the deadline)
// Anything else is an application error.
//
// How componentize-js 0.23 maps a function returning `result<T, string>`:
// a return value is `ok`; a thrown value that is not an `Error` (a string
// here) is `err(value)`, as is an object's `payload` property; a thrown
// `Error` is not caught: the component traps. Imports returning a `result`
// throw on `err` (`put` when the state quota is exhausted).
import { log } from 'terraphim:agent/log@0.1.1';
import { get, put } from 'terraphim:agent/state@0.1.1';

const KEY = 'count';

function count() {
  const bytes = get(KEY);
  if (bytes === undefined || bytes.length !== 8) return 0n;
  return new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
}

export const agent = {
  init(args) {
    log('info', `js agent ${args.agentId} initialised, count = ${count()}`);
  },
  start() {},
  stop() {},
  handleMessage(message) {
    switch (message) {
      case 'count': {
        const next = count() + 1n;
        const bytes = new Uint8Array(8);
        new DataView(bytes.buffer).setBigUint64(0, next, true);
        try {
          put(KEY, bytes);
        } catch (e) {
          // The host refused (quota): an application error, not a crash.
          throw `cannot store the count: ${e.payload ?? e}`;
        }
        return next.toString();
      }
      case 'get':
        return count().toString();
      case 'ping':
        return 'pong';
      case 'raise':
        throw new Error('asked to throw');
      case 'error':
        throw 'asked for an error';
      case 'loop':
        for (;;) {}
      default:
        throw `unknown message: ${message}`;
    }
  },
  handleSystemMessage(_message) {},
  healthCheck() {},
  terminate(_reason) {},
};
