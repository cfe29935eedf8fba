//! The WIT package's version: this host implements terraphim:agent@0.1.1
//! and keeps loading components built against 0.1.0 (wasmtime resolves
//! imports and exports semver-compatibly); a component of an incompatible
//! version gets an error that names both versions.

mod common;

use common::wat::{Fixture, agent_component};
use common::{runtime, started};
use terraphim_agent_supervisor::runtime::{AGENT_INTERFACE, WIT_VERSION};
use terraphim_agent_supervisor::{LoadError, examples};

/// The legacy guest example is built with wit-bindgen against a frozen copy
/// of the 0.1.0 WIT (guest-examples/legacy-agent/wit/agent.wit).
#[test]
fn the_legacy_guest_is_built_against_the_previous_version() {
    let wasm = String::from_utf8_lossy(examples::LEGACY);
    for name in [
        "terraphim:agent/agent@0.1.0",
        "terraphim:agent/log@0.1.0",
        "terraphim:agent/state@0.1.0",
    ] {
        assert!(wasm.contains(name), "the legacy agent names {name}");
    }
    assert!(!wasm.contains("terraphim:agent/agent@0.1.1"));
    assert_eq!(WIT_VERSION, "0.1.1");
    assert_eq!(AGENT_INTERFACE, "terraphim:agent/agent@0.1.1");
}

#[tokio::test]
async fn a_component_built_against_0_1_0_loads_and_runs() {
    // Its 0.1.0 imports (log, state) are linked to the host's 0.1.1 ones,
    // and its 0.1.0 `agent` export is found by the 0.1.1 bindings.
    let mut agent = started("legacy", "legacy-1", common::test_limits()).await;
    assert_eq!(agent.handle_message("ping").await.unwrap(), "pong");
    assert_eq!(agent.handle_message("count").await.unwrap(), "1");
    assert_eq!(agent.handle_message("count").await.unwrap(), "2");
}

#[test]
fn a_component_of_an_incompatible_version_is_refused_naming_both_versions() {
    let wat = agent_component(&Fixture::default())
        .replace("terraphim:agent/agent@0.1.0", "terraphim:agent/agent@0.2.0");
    let err = runtime()
        .load_bytes("newer.wat", wat.as_bytes())
        .unwrap_err();
    let LoadError::WrongWorld { missing, .. } = &err else {
        panic!("expected WrongWorld, got {err:?}");
    };
    assert!(
        missing.contains("built against terraphim:agent@0.2.0")
            && missing.contains("this host implements terraphim:agent@0.1.1")
            && missing.contains("0.1.x"),
        "{missing}"
    );
}

#[test]
fn an_import_of_a_later_version_the_host_lacks_names_the_host_version() {
    // A component of a later 0.1.x that imports an interface this host does
    // not have.
    let wat = agent_component(&Fixture::default()).replacen(
        "(component",
        r#"(component
  (import "terraphim:agent/future@0.1.9" (instance
    (export "f" (func))))"#,
        1,
    );
    let err = runtime()
        .load_bytes("later.wat", wat.as_bytes())
        .unwrap_err();
    let LoadError::UnsatisfiedImport { reason, .. } = &err else {
        panic!("expected UnsatisfiedImport, got {err:?}");
    };
    assert!(
        reason.contains("terraphim:agent/future@0.1.9")
            && reason.contains("this host implements terraphim:agent@0.1.1"),
        "{reason}"
    );
}
