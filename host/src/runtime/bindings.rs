//! Host bindings generated from `wit/agent.wit`.
//!
//! Exports are async so that calls can yield to tokio at epoch ticks; imports
//! are plain synchronous functions (they never block).

wasmtime::component::bindgen!({
    world: "supervised-agent",
    path: "../wit",
    exports: { default: async },
});
