//! Host bindings generated from `wit/agent.wit`.
//!
//! Exports are async so that calls can yield to tokio at epoch ticks. The
//! `state` imports are async too: a durable store syncs to disk, which must
//! not happen on a runtime worker, so the host awaits it on the blocking
//! pool (see `HostState`'s `state::Host`); they are trappable, so that a
//! store that cannot read fails the agent instead of answering "absent".
//! The `log` import stays a plain synchronous function (it never blocks);
//! so do the `timers` imports (they only update the store's timer table).
//! The `agents` imports are async: a call waits for another agent's reply.

wasmtime::component::bindgen!({
    world: "supervised-agent",
    path: "../wit",
    imports: {
        "terraphim:agent/state": async | trappable,
        "terraphim:agent/agents": async,
    },
    exports: { default: async },
    additional_derives: [PartialEq, Eq],
});
