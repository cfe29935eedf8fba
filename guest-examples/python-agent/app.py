"""Counter agent in Python: the Rust `echo-agent`'s behaviour, built with
componentize-py against ../../wit/agent.wit (world `supervised-agent`).

The counter lives in the host's per-agent state (key `count`, a
little-endian u64 as in the Rust agent), so a restarted instance continues
where its predecessor stopped.

Messages:
  count  increments the counter and replies with the new value
  get    replies with the counter
  ping   replies `pong`
  raise  raises an uncaught ValueError: a trap, the host sees a crash
  error  raises `Err`: an application error, the agent keeps running
  loop   loops forever (stopped by fuel or the deadline)
Anything else is an application error.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log, state, types

KEY = "count"


def count() -> int:
    value = state.get(KEY)
    if value is None or len(value) != 8:
        return 0
    return int.from_bytes(value, "little")


class Agent(exports.Agent):
    def init(self, args: types.InitArgs) -> None:
        log.log(
            log.Level.INFO,
            f"python agent {args.agent_id} initialised, count = {count()}",
        )

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def handle_message(self, message: str) -> str:
        if message == "count":
            value = count() + 1
            # `put` raises Err(str) when the state quota is exhausted; it
            # propagates as this call's application error.
            state.put(KEY, value.to_bytes(8, "little"))
            return str(value)
        if message == "get":
            return str(count())
        if message == "ping":
            return "pong"
        if message == "raise":
            # Not an `Err`: the binding cannot map it, the guest traps.
            raise ValueError("asked to raise")
        if message == "error":
            raise Err("asked for an error")
        if message == "loop":
            while True:
                pass
        raise Err(f"unknown message: {message!r}")

    def handle_system_message(self, message: types.SystemMessage) -> None:
        pass

    def health_check(self) -> None:
        pass

    def terminate(self, reason: types.TerminateReason) -> None:
        pass
