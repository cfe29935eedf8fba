//! The supervision defects of the hardening issue, with native agents that
//! record when each incarnation lives: every kill path cascades and is
//! awaited (never two incarnations of one child alive), and a failing
//! restart never blocks its supervisor's mailbox. Calls run in their
//! callers' tasks: a kill ends a call under way before the successor
//! starts, a call whose caller gave up is still handled whole, and one
//! caller's casts and calls reach the agent in order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::wait_for;
use serde_json::json;
use terraphim_agent_supervisor::{
    AgentFactory, AgentPid, AgentSpec, AgentStatus, AgentSupervisor, EventKind, ExitReason,
    InitArgs, RestartAction, RestartIntensity, RestartPolicy, RestartStrategy, ShutdownPolicy,
    SupervisedAgent, SupervisionError, SupervisionResult, SupervisorConfig, SupervisorSpec,
    SupervisorStatus,
};

/// What the agents of one test did.
#[derive(Default)]
struct Log {
    /// Incarnations alive now, by agent name.
    alive: HashMap<String, usize>,
    /// The most incarnations of one name alive at once.
    max_alive: HashMap<String, usize>,
    /// `stop` calls that ran to their end.
    graceful_stops: usize,
    /// `init` calls running now, and the most at once.
    inits: usize,
    max_inits: usize,
    /// Incarnations created, by agent name.
    created: HashMap<String, usize>,
    /// Every message handed to an agent, in the order they arrived.
    messages: Vec<String>,
    /// Messages an agent was handling when it stopped waiting (`gate`,
    /// `hang`), and those it finished.
    entered_calls: usize,
    finished_calls: usize,
}

/// The log, and the gate that `gate` messages wait at.
#[derive(Default)]
struct Registry(Mutex<Log>, tokio::sync::Notify);

impl Registry {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // A failed assertion while locked must not turn every later drop into
        // a panic (and abort the test binary).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive(&self) -> usize {
        self.log().alive.values().sum()
    }

    fn max_alive(&self, name: &str) -> usize {
        self.log().max_alive.get(name).copied().unwrap_or(0)
    }

    fn created(&self, name: &str) -> usize {
        self.log().created.get(name).copied().unwrap_or(0)
    }
}

/// How an agent behaves, by its type.
#[derive(Clone, Copy)]
enum Kind {
    /// Runs; its `stop` takes 300 ms.
    Worker,
    /// Its first incarnation runs; every later one fails to start after
    /// 30 ms.
    Flaky,
    /// Its `init` never ends: it blocks its thread 20 ms at a time.
    SlowInit,
}

struct Tracked {
    name: String,
    kind: Kind,
    incarnation: usize,
    registry: Arc<Registry>,
    entered: bool,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.entered {
            *self
                .registry
                .log()
                .alive
                .entry(self.name.clone())
                .or_default() -= 1;
        }
    }
}

/// Counts a running `init` until dropped (the call returned or was
/// cancelled).
struct InitGuard(Arc<Registry>);

impl Drop for InitGuard {
    fn drop(&mut self) {
        self.0.log().inits -= 1;
    }
}

#[async_trait]
impl SupervisedAgent for Tracked {
    async fn init(&mut self, _args: InitArgs) -> SupervisionResult<()> {
        {
            let mut log = self.registry.log();
            let alive = log.alive.entry(self.name.clone()).or_default();
            *alive += 1;
            let now = *alive;
            let max = log.max_alive.entry(self.name.clone()).or_default();
            *max = (*max).max(now);
            log.inits += 1;
            log.max_inits = log.max_inits.max(log.inits);
        }
        self.entered = true;
        let _guard = InitGuard(self.registry.clone());
        if let Kind::SlowInit = self.kind {
            loop {
                // Blocks its worker thread, as a busy guest does between
                // two yields: a cancellation takes effect only after it.
                std::thread::sleep(Duration::from_millis(20));
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    async fn start(&mut self) -> SupervisionResult<()> {
        if let Kind::Flaky = self.kind
            && self.incarnation > 0
        {
            tokio::time::sleep(Duration::from_millis(30)).await;
            return Err(SupervisionError::System("still broken".into()));
        }
        Ok(())
    }

    async fn stop(&mut self) -> SupervisionResult<()> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.registry.log().graceful_stops += 1;
        Ok(())
    }

    /// `gate` waits until the test opens the gate; `hang` never ends;
    /// anything else is echoed. Each is logged when it arrives.
    async fn handle_message(&mut self, message: String) -> SupervisionResult<String> {
        self.registry.log().messages.push(message.clone());
        match message.as_str() {
            "gate" => {
                self.registry.log().entered_calls += 1;
                self.registry.1.notified().await;
            }
            "hang" => {
                self.registry.log().entered_calls += 1;
                std::future::pending::<()>().await;
            }
            _ => return Ok(message),
        }
        self.registry.log().finished_calls += 1;
        Ok(message)
    }
}

struct Factory(Arc<Registry>);

#[async_trait]
impl AgentFactory for Factory {
    async fn create_agent(&self, spec: &AgentSpec) -> SupervisionResult<Box<dyn SupervisedAgent>> {
        let kind = match spec.agent_type.as_str() {
            "worker" => Kind::Worker,
            "flaky" => Kind::Flaky,
            "slow-init" => Kind::SlowInit,
            other => return Err(SupervisionError::InvalidAgentSpec(other.into())),
        };
        let name = spec.name.clone().unwrap_or_default();
        let incarnation = {
            let mut log = self.0.log();
            let created = log.created.entry(name.clone()).or_default();
            *created += 1;
            *created - 1
        };
        Ok(Box::new(Tracked {
            name,
            kind,
            incarnation,
            registry: self.0.clone(),
            entered: false,
        }))
    }

    fn validate_spec(&self, spec: &AgentSpec) -> SupervisionResult<()> {
        // A bug in a factory, as seen from the supervisor it runs in.
        assert_ne!(spec.agent_type, "panic", "the factory panics on this spec");
        Ok(())
    }

    fn supported_types(&self) -> Vec<String> {
        ["worker", "flaky", "slow-init", "panic"]
            .map(String::from)
            .to_vec()
    }
}

fn config(max_restarts: u32) -> SupervisorConfig {
    SupervisorConfig {
        restart_policy: RestartPolicy::new(
            RestartStrategy::OneForOne,
            RestartIntensity::new(max_restarts, Duration::from_secs(60)),
        ),
        agent_timeout: Duration::from_secs(10),
        ..SupervisorConfig::default()
    }
}

fn agent(kind: &str, name: &str) -> AgentSpec {
    AgentSpec::new(kind.into(), json!({})).with_name(name.into())
}

/// A root over a nested supervisor `team` (killed brutally when stopped)
/// with two workers whose graceful stop takes 300 ms.
async fn team_tree() -> (AgentSupervisor, AgentPid, Arc<Registry>) {
    let registry = Arc::new(Registry::default());
    let factory = Arc::new(Factory(registry.clone()));
    let team = SupervisorSpec::new(config(10), factory.clone())
        .with_name("team".into())
        .with_shutdown(ShutdownPolicy::BrutalKill)
        .with_child(agent("worker", "w1"))
        .with_child(agent("worker", "w2"));
    let team_id = team.id.clone();
    let mut sup = AgentSupervisor::new(config(10), factory).with_child(team);
    sup.start().await.unwrap();
    assert_eq!(registry.alive(), 2);
    (sup, team_id, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_nested_supervisor_takes_its_workers_with_it() {
    let (mut sup, team, registry) = team_tree().await;
    sup.terminate_child(&team).await.unwrap();
    assert_eq!(
        registry.alive(),
        0,
        "when terminate_child returns, the killed supervisor's workers are gone"
    );
    assert_eq!(
        registry.log().graceful_stops,
        0,
        "killed workers do not run a graceful stop after the kill"
    );
    sup.restart_child(&team).await.unwrap();
    assert_eq!(registry.alive(), 2);
    assert_eq!(registry.max_alive("w1"), 1, "never two incarnations of w1");
    assert_eq!(registry.max_alive("w2"), 1, "never two incarnations of w2");
    sup.stop().await.unwrap();
    assert_eq!(registry.alive(), 0, "stop returns once nothing runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_supervisor_reported_dead_is_killed_before_it_is_restarted() {
    let (mut sup, team, registry) = team_tree().await;
    sup.handle_agent_exit(team.clone(), ExitReason::Error("reported".into()))
        .await
        .unwrap();
    assert_eq!(registry.alive(), 2, "one new incarnation of each worker");
    assert_eq!(registry.created("w1"), 2);
    assert_eq!(registry.max_alive("w1"), 1, "never two incarnations of w1");
    assert_eq!(registry.max_alive("w2"), 1, "never two incarnations of w2");
    sup.stop().await.unwrap();
    assert_eq!(registry.alive(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_nested_supervisor_ends_its_subtree_before_its_restart() {
    let (mut sup, team, registry) = team_tree().await;
    let mut events = sup.subscribe();
    let nested = sup.child_supervisor(&team).unwrap();
    // The factory panics inside the nested supervisor's task.
    assert!(nested.spawn_agent(agent("panic", "boom")).await.is_err());
    wait_for(
        &mut events,
        |e| matches!(&e.kind, EventKind::ChildRestarted { agent, .. } if *agent == team),
    )
    .await;
    let history = sup.get_restart_history().await;
    assert!(
        matches!(&history[0].reason, ExitReason::Error(e) if e.contains("panicked")),
        "{history:?}"
    );
    assert_eq!(registry.created("w1"), 2);
    assert_eq!(registry.max_alive("w1"), 1, "never two incarnations of w1");
    assert_eq!(registry.max_alive("w2"), 1, "never two incarnations of w2");
    sup.stop().await.unwrap();
    assert_eq!(registry.alive(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_supervisor_kills_the_tree() {
    let (sup, _team, registry) = team_tree().await;
    drop(sup);
    // Dropping cannot wait; the tasks end at their next await point.
    for _ in 0..500 {
        if registry.alive() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(registry.alive(), 0);
    assert_eq!(registry.log().graceful_stops, 0, "killed, not stopped");
}

/// A root over one flaky child that has crashed: its restart attempts fail
/// one after another (30 ms each) until `max_restarts` is exceeded.
async fn failing_restarts(max_restarts: u32) -> (AgentSupervisor, AgentPid, Arc<Registry>) {
    let registry = Arc::new(Registry::default());
    let mut sup = AgentSupervisor::new(config(max_restarts), Arc::new(Factory(registry.clone())));
    sup.start().await.unwrap();
    let pid = sup.spawn_agent(agent("flaky", "f")).await.unwrap();
    // Before the fix this returned only once every attempt had failed.
    sup.handle_agent_exit(pid.clone(), ExitReason::Error("crash".into()))
        .await
        .unwrap();
    (sup, pid, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_between_failing_restart_attempts() {
    let (mut sup, pid, registry) = failing_restarts(60).await;
    let count = sup.count_children().await.unwrap();
    assert_eq!((count.specs, count.active), (1, 0));
    assert!(
        registry.created("f") < 30,
        "count_children was answered while the attempts went on ({} so far)",
        registry.created("f")
    );
    let children = sup.get_children().await;
    assert_eq!(children[0].1.status, AgentStatus::Restarting);
    assert!(matches!(
        sup.restart_child(&pid).await,
        Err(SupervisionError::AgentRestarting(_))
    ));
    assert!(matches!(
        sup.delete_child(&pid).await,
        Err(SupervisionError::AgentRestarting(_))
    ));
    let history = sup.get_restart_history().await;
    assert!(
        history
            .iter()
            .any(|e| e.action == RestartAction::StartFailed),
        "{history:?}"
    );
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_failing_restart_attempts_ends_stopped_not_failed() {
    let (mut sup, _pid, registry) = failing_restarts(60).await;
    sup.stop().await.unwrap();
    assert_eq!(sup.status(), SupervisorStatus::Stopped);
    let attempts = registry.created("f");
    assert!(
        attempts < 30,
        "the stop did not wait for {attempts} attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_restarting_child_cancels_its_next_attempt() {
    let (mut sup, pid, registry) = failing_restarts(1000).await;
    sup.terminate_child(&pid).await.unwrap();
    let attempts = registry.created("f");
    // Let any queued attempt run, were it still queued.
    let _ = sup.count_children().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        registry.created("f"),
        attempts,
        "no attempt after terminate"
    );
    let children = sup.get_children().await;
    assert_eq!(children[0].1.status, AgentStatus::Stopped);
    // It may be restarted by hand again (it still fails to start).
    assert!(matches!(
        sup.restart_child(&pid).await,
        Err(SupervisionError::AgentStartFailed(..))
    ));
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_times_out_is_killed_before_the_next_one_begins() {
    let registry = Arc::new(Registry::default());
    let config = SupervisorConfig {
        agent_timeout: Duration::from_millis(100),
        ..config(10)
    };
    let mut sup = AgentSupervisor::new(config, Arc::new(Factory(registry.clone())));
    sup.start().await.unwrap();
    let spec = agent("slow-init", "slow");
    for _ in 0..5 {
        match sup.spawn_agent(spec.clone()).await {
            Err(SupervisionError::AgentStartFailed(_, why)) => {
                assert!(why.contains("did not start within"), "{why}");
            }
            other => panic!("expected a start timeout, got {other:?}"),
        }
        assert_eq!(registry.log().inits, 0, "the timed-out init has ended");
    }
    assert_eq!(registry.log().max_inits, 1, "never two inits at once");
    assert_eq!(registry.max_alive("slow"), 1);
    sup.stop().await.unwrap();
}

/// A root over one worker `w` (killed brutally when stopped).
async fn one_worker() -> (AgentSupervisor, AgentPid, Arc<Registry>) {
    let registry = Arc::new(Registry::default());
    let factory = Arc::new(Factory(registry.clone()));
    let worker = agent("worker", "w").with_shutdown(ShutdownPolicy::BrutalKill);
    let pid = worker.agent_id.clone();
    let mut sup = AgentSupervisor::new(config(10), factory).with_child(worker);
    sup.start().await.unwrap();
    (sup, pid, registry)
}

/// Wait (bounded) until `done` holds of the log.
async fn until(registry: &Registry, done: impl Fn(&Log) -> bool) {
    for _ in 0..2000 {
        if done(&registry.log()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the agents never got there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_ends_the_call_under_way_before_the_successor_starts() {
    let (mut sup, pid, registry) = one_worker().await;
    let handle = sup.handle().unwrap();
    let caller = {
        let (handle, pid) = (handle.clone(), pid.clone());
        tokio::spawn(async move { handle.call(&pid, "hang".into()).await })
    };
    until(&registry, |log| log.entered_calls == 1).await;
    // The call runs in the caller's task; the kill must still reach it.
    let killed = tokio::time::timeout(
        Duration::from_secs(30),
        sup.handle_agent_exit(pid.clone(), ExitReason::Error("reported".into())),
    )
    .await
    .expect("the kill waits for nothing but the agent's end");
    killed.unwrap();
    assert_eq!(registry.created("w"), 2, "restarted");
    assert_eq!(registry.max_alive("w"), 1, "never two incarnations of w");
    let answer = caller.await.unwrap();
    assert!(
        matches!(answer, Err(SupervisionError::CommunicationFailed(_))),
        "{answer:?}"
    );
    assert_eq!(handle.call(&pid, "ping".into()).await.unwrap(), "ping");
    sup.terminate_child(&pid).await.unwrap();
    assert_eq!(
        registry.alive(),
        0,
        "a brutal kill returns once nothing runs"
    );
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_caller_gave_up_on_is_still_handled_whole() {
    let (mut sup, pid, registry) = one_worker().await;
    let handle = sup.handle().unwrap();
    let caller = {
        let (handle, pid) = (handle.clone(), pid.clone());
        tokio::spawn(async move { handle.call(&pid, "gate".into()).await })
    };
    until(&registry, |log| log.entered_calls == 1).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    registry.1.notify_one();
    until(&registry, |log| log.finished_calls == 1).await;
    // And the agent was neither restarted nor left locked.
    assert_eq!(handle.call(&pid, "next".into()).await.unwrap(), "next");
    assert_eq!(registry.created("w"), 1);
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casts_and_calls_from_one_caller_arrive_in_order() {
    let (mut sup, pid, registry) = one_worker().await;
    let handle = sup.handle().unwrap();
    for round in 0..50 {
        let casts: Vec<String> = (0..3).map(|i| format!("cast {round}.{i}")).collect();
        for cast in &casts {
            handle.cast(&pid, cast.clone()).unwrap();
        }
        let call = format!("call {round}");
        assert_eq!(handle.call(&pid, call.clone()).await.unwrap(), call);
        let log = registry.log();
        assert!(log.messages.len() >= 4, "round {round}: {:?}", log.messages);
        let tail = &log.messages[log.messages.len() - 4..];
        assert_eq!(tail[..3], casts[..], "round {round}: the casts first");
        assert_eq!(tail[3], call, "round {round}: then the call");
    }
    sup.stop().await.unwrap();
}
