//! The guest examples of `guest-examples/`, built for wasm32-wasip2 by the build script and embedded.

/// The echo/counter agent (durable state through the host state interface).
pub const ECHO: &[u8] = include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/echo_agent.wasm"));
/// The crasher agent: panics, `unreachable`, out-of-bounds memory access, stack
/// overflow and divide-by-zero traps on request; can fail `start` or panic in `init` by config.
pub const CRASHER: &[u8] =
    include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/crasher_agent.wasm"));
/// The fuel-burner agent: `burn` is an endless pure-compute loop (fuel and epoch interruption).
pub const FUEL_BURNER: &[u8] = include_bytes!(concat!(
    env!("TERRAPHIM_GUEST_DIR"),
    "/fuel_burner_agent.wasm"
));
/// The memory-hog agent: `grow` allocates until the memory limit makes it trap; `grow <n>` takes n MiB.
pub const MEMORY_HOG: &[u8] = include_bytes!(concat!(
    env!("TERRAPHIM_GUEST_DIR"),
    "/memory_hog_agent.wasm"
));
/// The sleeper agent: `sleep <ms>` blocks in WASI, `spin <ms>` busy-waits on the clock;
/// config `stop_delay_ms` makes `stop` slow.
pub const SLEEPER: &[u8] =
    include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/sleeper_agent.wasm"));
/// The failing-init agent: `init` returns an error unless config `succeed` is true.
pub const FAILING_INIT: &[u8] = include_bytes!(concat!(
    env!("TERRAPHIM_GUEST_DIR"),
    "/failing_init_agent.wasm"
));
/// The exit agent: `exit <code>` calls WASI `exit`.
pub const EXIT: &[u8] = include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/exit_agent.wasm"));

/// The sandbox-probe agent: reports which environment variables, arguments,
/// files and network addresses it can reach (WASI is deny-by-default).
pub const SANDBOX_PROBE: &[u8] = include_bytes!(concat!(
    env!("TERRAPHIM_GUEST_DIR"),
    "/sandbox_probe_agent.wasm"
));

/// The hostile agent: floods the host's log, returns huge replies and
/// errors, fills its state until refused (the host's bounds at work).
pub const HOSTILE: &[u8] =
    include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/hostile_agent.wasm"));

/// The moody agent: turns unhealthy on command (`sick`, `faint`), and can
/// break itself (`break`) so that it cannot start while its state says so.
pub const MOODY: &[u8] = include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/moody_agent.wasm"));

/// The caller agent: calls and casts to other agents, sets and cancels
/// timers, fetches URLs over `wasi:http`, on command.
pub const CALLER: &[u8] =
    include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/caller_agent.wasm"));

/// The LLM agent: answers through an OpenAI-compatible chat-completions
/// endpoint (its config), delegating sub-questions to other agents.
pub const LLM: &[u8] = include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/llm_agent.wasm"));

/// The legacy agent: built against `terraphim:agent@0.1.0`, the previous
/// WIT version, which this host still loads.
pub const LEGACY: &[u8] =
    include_bytes!(concat!(env!("TERRAPHIM_GUEST_DIR"), "/legacy_agent.wasm"));

/// All examples by agent-type name ("echo", "crasher", "fuel-burner",
/// "memory-hog", "sleeper", "failing-init", "exit", "sandbox-probe",
/// "hostile", "moody", "caller", "llm", "legacy").
pub const ALL: &[(&str, &[u8])] = &[
    ("echo", ECHO),
    ("crasher", CRASHER),
    ("fuel-burner", FUEL_BURNER),
    ("memory-hog", MEMORY_HOG),
    ("sleeper", SLEEPER),
    ("failing-init", FAILING_INIT),
    ("exit", EXIT),
    ("sandbox-probe", SANDBOX_PROBE),
    ("hostile", HOSTILE),
    ("moody", MOODY),
    ("caller", CALLER),
    ("llm", LLM),
    ("legacy", LEGACY),
];
