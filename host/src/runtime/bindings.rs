//! Host bindings generated from `wit/agent.wit`.
//!
//! Exports are async so that calls can yield to tokio at epoch ticks. The
//! `state` imports are async too: a durable store syncs to disk, which must
//! not happen on a runtime worker, so the host awaits it on the blocking
//! pool (see `HostState`'s `state::Host`); they are trappable, so that a
//! store that cannot read fails the agent instead of answering "absent".
//! The `log` import stays a plain synchronous function (it never blocks).

wasmtime::component::bindgen!({
    world: "supervised-agent",
    path: "../wit",
    imports: { "terraphim:agent/state": async | trappable },
    exports: { default: async },
});
