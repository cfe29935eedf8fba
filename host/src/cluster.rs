//! One supervision tree across several hosts, on NATS JetStream (feature
//! `cluster`).
//!
//! The **placement units** are the children of the root supervisor: each
//! runs, with its whole subtree, on exactly one host at a time, supervised
//! there by the ordinary local code. Which host runs a unit is decided by a
//! **lease** in a JetStream key/value bucket (`ah-<tree>-leases`, key
//! `unit.<name>`):
//!
//! - A unit starts only after this host created its lease (compare-and-set:
//!   the write names the revision it replaces, so of several hosts exactly
//!   one wins).
//! - The owner renews the lease every `T/4` (`[cluster] lease_ttl`, default
//!   10 s), again by compare-and-set on the revision it wrote last.
//! - **Fencing**: the owner measures its lease by its own clock, from the
//!   moment it *sent* its last successful renewal. From that moment plus
//!   `3T/4` on, it answers no call for the unit and the unit's state writes
//!   are refused ([`UnitGate`]), and the unit is stopped. A host that lost
//!   a lease (it could not renew in time, or its compare-and-set failed)
//!   comes back only as a new incarnation, by winning the lease again.
//! - The other hosts watch the bucket. nats-server 2.9 has no per-key TTL
//!   and no expiry notification, so each host times every lease itself: a
//!   lease whose revision did not change for `T` since this host *saw* it
//!   change is expired, and the host tries to take the unit over by
//!   compare-and-set on that revision. Since a host sees a renewal after
//!   the owner sent it, the owner has fenced itself `T/4` before anyone
//!   can take over (clocks may drift by far less than `T/4` over `T`).
//! - A unit may require host labels (`placement = { labels = {...} }`);
//!   only hosts whose `--labels` include them compete for it.
//! - **Graceful handover**: a host that stops stops each unit it runs and
//!   then deletes its lease (compare-and-set), so that another host takes
//!   it over at once instead of after `T`.
//!
//! Every incarnation of a unit has an id (a UUID, in the lease), and the
//! lease's KV revision is its fencing token. **Calls by path** go over NATS
//! request/reply, on a subject per agent path
//! (`ah.<tree>.call.<unit>[.<segment>...]`) to which only the current
//! owner subscribes (never a queue group shared by incarnations); a call
//! carries a call id header so that agents can de-duplicate (a failover
//! makes delivery at-least-once), and a reply names the incarnation and
//! lease revision that produced it. No responders (no owner right now) is
//! retried until the caller's deadline. A call to a unit this host runs
//! stays in the process.
//!
//! **Supervision across hosts.** The root's restarts of its units (a
//! takeover; a unit that exited and was restarted by its host's root) are
//! recorded in a shared history (`ah-<tree>-history`) and judged against
//! the root's intensity in one window over the cluster. Each host's local
//! root is `one_for_one`; the root's `one_for_all` / `rest_for_one` is
//! applied from the history, which every host watches: for each counted
//! restart of a unit, each host restarts the units it runs that the
//! strategy restarts with it (stopped last first, then started first
//! first, keeping their leases). There is no barrier across hosts: the
//! order holds within a host, and the unit that caused it runs again
//! before any other restarts.

mod history;
mod kv_state;
mod subject;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use history::{HistoryEntry, HistoryError, MAX_ENTRIES, RestartKind, counted_within};
pub use kv_state::KvStateStore;
pub use subject::{call_subject, token};

use crate::runtime::Runtime;
use crate::tree::{TreeError, TreeFile, valid_label};
use crate::{
    ChildSpec, ErrorCategory, EventKind, RestartIntensity, RestartStrategy, RunningTree,
    StateQuota, SupervisorEvent, TreeCallError, TreeHandle,
};

/// The request header with the caller's call id (a UUID unless the caller
/// chose one): the same id on every retry of one call.
pub const CALL_ID_HEADER: &str = "Agent-Host-Call-Id";
/// The request header with the agent's full path (`root/unit/agent`).
pub const PATH_HEADER: &str = "Agent-Host-Path";
/// The reply header naming the incarnation that answered.
pub const INCARNATION_HEADER: &str = "Agent-Host-Incarnation";
/// The reply header with the lease revision (the fencing token) of the
/// incarnation that answered.
pub const REVISION_HEADER: &str = "Agent-Host-Lease-Revision";
/// The reply header naming the host that answered.
pub const HOST_HEADER: &str = "Agent-Host-Host";

/// The reply header of a host that no longer runs the unit (fenced or
/// handing it over): no agent saw the call, try again (the next owner).
pub const RETRY_HEADER: &str = "Agent-Host-Retry";

/// The request header that asks a unit's owner for the status of the
/// unit's nodes instead of calling an agent (see
/// [`ClusterClient::unit_nodes`]).
pub const STATUS_HEADER: &str = "Agent-Host-Status";

/// Longest host id accepted (`--host-id`).
pub const MAX_HOST_ID: usize = 64;

/// How many calls one unit serves at once; more wait in the subscription.
const CONCURRENT_CALLS_PER_UNIT: usize = 64;

/// How a host joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// This host's id, unique in the cluster: letters, digits, `-`, `_`,
    /// `.`, at most [`MAX_HOST_ID`] bytes.
    pub host_id: String,
    /// This host's labels (`--labels zone=a`), matched against the units'
    /// `placement` labels.
    pub labels: BTreeMap<String, String>,
}

/// Why a host could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The host id is not usable.
    #[error(
        "host id `{0}`: use letters, digits, `-`, `_` and `.` only, at most {MAX_HOST_ID} bytes"
    )]
    HostId(String),
    /// The NATS server could not be reached.
    #[error("cannot connect to the NATS server at {url}: {source}")]
    Connect {
        /// The server's address.
        url: String,
        /// What the client said.
        source: async_nats::ConnectError,
    },
    /// A JetStream bucket could not be opened or created (is JetStream on?
    /// `nats-server -js`).
    #[error(
        "cannot open the JetStream key/value bucket `{bucket}` (does the server run with JetStream, `nats-server -js`?): {message}"
    )]
    Bucket {
        /// The bucket's name.
        bucket: String,
        /// What the server said.
        message: String,
    },
    /// The tree file could not be read (to hash it).
    #[error("cannot read the tree file {path}: {source}")]
    ReadTree {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another host of this cluster runs a different tree file.
    #[error(
        "this tree file (sha256 {ours}) differs from the one the cluster's hosts run (sha256 {theirs}); every host of a cluster must run the same file. Copy the same file to every host (or, if the whole cluster is down and the change is meant, delete the key `tree` of the bucket `{bucket}`)"
    )]
    TreeDiffers {
        /// The hash of this host's file.
        ours: String,
        /// The hash the cluster recorded.
        theirs: String,
        /// The leases bucket.
        bucket: String,
    },
    /// The cluster's root supervisor gave up (its restart intensity was
    /// exceeded by the restarts of its units across the cluster): the
    /// tree is down on every host.
    #[error(
        "the tree is down in this cluster: its root supervisor gave up ({reason}); to start it again, delete the key `halt` of the bucket `{bucket}`"
    )]
    Halted {
        /// Why it gave up.
        reason: String,
        /// The leases bucket.
        bucket: String,
    },
    /// The tree's components could not be loaded.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The (empty) root supervisor did not start.
    #[error("the root supervisor did not start: {0}")]
    Start(#[from] crate::SupervisionError),
}

/// Something that happened to a unit on this host, for the command line's
/// event lines and for tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClusterEvent {
    /// This host won the unit's lease: a new incarnation.
    Acquired {
        /// The unit (a child of the root).
        unit: String,
        /// The new incarnation's id.
        incarnation: String,
        /// The lease revision (fencing token).
        revision: u64,
        /// Whether the lease had expired (its holder was lost): a takeover,
        /// not a handover.
        takeover: bool,
    },
    /// The unit runs here, serving calls.
    Started {
        /// The unit.
        unit: String,
        /// Its incarnation.
        incarnation: String,
    },
    /// The unit failed to start; its lease is given up.
    StartFailed {
        /// The unit.
        unit: String,
        /// Its incarnation.
        incarnation: String,
        /// Why.
        error: String,
    },
    /// The lease was lost or could not be renewed in time: the unit no
    /// longer answers, and is being stopped.
    Fenced {
        /// The unit.
        unit: String,
        /// Its incarnation.
        incarnation: String,
        /// Why.
        reason: String,
    },
    /// The unit stopped here (after a fence or for a handover).
    Stopped {
        /// The unit.
        unit: String,
        /// Its incarnation.
        incarnation: String,
    },
    /// The unit was restarted here, keeping its lease and incarnation (a
    /// new local instance of its subtree), because the root's strategy
    /// (`one_for_all`, `rest_for_one`) restarts it with `cause`, a unit
    /// restarted somewhere in the cluster.
    Restarted {
        /// The unit.
        unit: String,
        /// Its incarnation (unchanged).
        incarnation: String,
        /// The unit whose restart (a crash or a takeover) caused this one.
        cause: String,
    },
    /// The lease was deleted after the unit stopped: another host may take
    /// the unit over at once.
    Released {
        /// The unit.
        unit: String,
        /// Its incarnation.
        incarnation: String,
    },
}

/// A unit and who holds its lease.
#[derive(Debug, Clone, Serialize)]
pub struct UnitStatus {
    /// The unit.
    pub unit: String,
    /// The lease's holder, if it is held.
    pub holder: Option<LeaseRecord>,
    /// The lease's revision (0: never held).
    pub revision: u64,
}

/// What a lease holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The owner's host id.
    pub host: String,
    /// The incarnation's id.
    pub incarnation: String,
    /// The lease time, in milliseconds.
    pub ttl_ms: u64,
    /// When the incarnation began (milliseconds since the Unix epoch, the
    /// owner's clock; informative only).
    pub since_ms: u64,
    /// The owner's session (one run of `agent-host`): the takeovers of the
    /// units of one lost session count as one restart.
    #[serde(default)]
    pub session: String,
}

/// What a host says about itself while it is in the cluster: the key
/// `host.<id>` of the leases bucket, written when it joins and renewed with
/// its leases (every `T/4`), deleted when it leaves gracefully.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    /// Its host id.
    pub host: String,
    /// Its labels (`--labels`).
    pub labels: BTreeMap<String, String>,
    /// Its session (one run of `agent-host`).
    pub session: String,
    /// The lease time: a record not renewed for that long is a host gone
    /// silent (killed, paused, cut off from the server).
    pub ttl_ms: u64,
    /// When it was last renewed (milliseconds since the Unix epoch, the
    /// host's clock).
    pub at_ms: u64,
    /// Whether it was drained (`cluster drain`): it takes no unit.
    #[serde(default)]
    pub draining: bool,
}

/// A host of the cluster as [`ClusterClient::hosts`] sees it.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// What it last said about itself.
    #[serde(flatten)]
    pub record: HostRecord,
    /// Whether it renewed its record within its lease time, by this
    /// process's clock (clocks are assumed roughly in step).
    pub live: bool,
    /// The units whose lease it holds (none: an idle host).
    pub units: Vec<String>,
}

/// Most host records read by [`ClusterClient::hosts`].
pub const MAX_HOSTS: usize = 1024;

/// The longest host record read (a larger one is skipped): a host id and
/// a few labels take far less.
const MAX_HOST_RECORD_BYTES: usize = 64 << 10;

/// The key of a host's record.
fn host_key(host: &str) -> String {
    format!("host.{}", token(host))
}

/// A unit's fence on this host: until when it may answer calls and write
/// state, by this host's clock. Closed unless this host holds the lease.
#[derive(Debug, Default)]
pub struct UnitGate {
    valid_until: Mutex<Option<Instant>>,
}

impl UnitGate {
    /// Whether the unit may answer and write now.
    pub fn is_open(&self) -> bool {
        self.valid_until()
            .is_some_and(|until| Instant::now() < until)
    }

    fn valid_until(&self) -> Option<Instant> {
        // Only `Option<Instant>` assignments happen under this lock.
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, until: Option<Instant>) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }
}

/// The gates of the units, by unit name, shared by the lease manager, the
/// call servers and the state store.
#[derive(Debug, Default)]
pub(crate) struct Gates {
    by_unit: HashMap<String, Arc<UnitGate>>,
}

impl Gates {
    fn gate(&self, unit: &str) -> Option<&Arc<UnitGate>> {
        self.by_unit.get(unit)
    }
}

/// Milliseconds since the Unix epoch, by this host's clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The bucket names and subject prefix of one tree.
#[derive(Debug, Clone)]
pub struct ClusterNames {
    /// The root supervisor's name.
    pub root: String,
    /// The leases bucket.
    pub leases: String,
    /// The agents' state bucket.
    pub state: String,
    /// The shared restart history's bucket.
    pub history: String,
    /// The prefix of the call subjects.
    pub calls: String,
    /// The prefix of the drain subjects (one per host).
    pub drain: String,
}

impl ClusterNames {
    /// The names of the tree whose root supervisor is `root`.
    pub fn of(root: &str) -> Self {
        let t = token(root);
        Self {
            root: root.to_owned(),
            leases: format!("ah-{t}-leases"),
            state: format!("ah-{t}-state"),
            history: format!("ah-{t}-history"),
            calls: format!("ah.{t}.call"),
            drain: format!("ah.{t}.drain"),
        }
    }
}

/// The lease key of a unit.
fn lease_key(unit: &str) -> String {
    format!("unit.{}", token(unit))
}

/// Open or create a key/value bucket. The bucket's stream is created here
/// with the key/value conventions (what `create_key_value` would make)
/// because `create_key_value` first reads the account's JetStream info in a
/// shape only servers from 2.10 on send; 2.9 serves everything else used.
async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    history: i64,
) -> Result<kv::Store, JoinError> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = async_nats::jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some("agent-host cluster".into()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history,
        storage: async_nats::jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    let created = js.get_or_create_stream(config).await;
    match js.get_key_value(name).await {
        Ok(store) => Ok(store),
        Err(open) => Err(JoinError::Bucket {
            bucket: name.to_owned(),
            message: match created {
                Err(e) => e.to_string(),
                Ok(_) => open.to_string(),
            },
        }),
    }
}

/// Where a call goes: a cluster client (any process) or a host.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    client: async_nats::Client,
    names: ClusterNames,
    /// The tree's units, when known (a host's client): a call to a unit
    /// that does not exist fails at once instead of at its deadline.
    units: Arc<[String]>,
    /// The host this client belongs to, if any.
    host: Option<String>,
}

/// The nodes of one unit, as the host that runs it answered.
#[derive(Debug, Clone)]
pub struct UnitNodes {
    /// The host that answered.
    pub host: String,
    /// The unit's incarnation there.
    pub incarnation: String,
    /// Its lease revision.
    pub revision: u64,
    /// The unit and the nodes below it, depth first in start order.
    pub nodes: Vec<crate::NodeStatus>,
}

/// Why a call by path across hosts failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterCallError {
    /// The path names no unit of the tree (it does not start with the
    /// root's name and a child's).
    #[error("`{0}` is not the path of an agent of this tree: write root/unit[/...]")]
    BadPath(String),
    /// The tree has no such unit.
    #[error("no unit `{unit}` in this tree; its units are: {}", units.join(", "))]
    NoSuchUnit {
        /// The unit asked for.
        unit: String,
        /// The tree's units.
        units: Vec<String>,
    },
    /// Nobody answered before the deadline (no owner, or it did not reply).
    #[error("no reply from `{path}` within {timeout:?} ({attempts} attempts; last: {last})")]
    Timeout {
        /// The agent.
        path: String,
        /// The caller's deadline.
        timeout: Duration,
        /// How many requests were sent.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The request could not be sent.
    #[error("cannot send the call to `{path}`: {message}")]
    Send {
        /// The agent.
        path: String,
        /// What the client said.
        message: String,
    },
    /// The reply could not be read.
    #[error("the reply from `{path}` is malformed: {message}")]
    BadReply {
        /// The agent.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The agent's host answered with an error (an application error, a
    /// crash, an unknown path below the unit, ...).
    #[error("{error} (on host {host})")]
    Remote {
        /// The agent.
        path: String,
        /// The error, as its host put it.
        error: String,
        /// Its category (`Runtime`, `NotFound`, ...), if given.
        category: Option<String>,
        /// The host that answered.
        host: String,
    },
    /// The local tree refused or failed the call.
    #[error(transparent)]
    Local(#[from] TreeCallError),
}

/// The reply to a call across hosts, with who produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReply {
    /// The agent's reply, or its error as text (an application error, a
    /// crash, an unknown path, ...).
    pub result: Result<String, String>,
    /// The error's category (`Runtime`, `Validation`, ...), for an error.
    pub category: Option<String>,
    /// The incarnation of the unit that answered.
    pub incarnation: String,
    /// Its lease revision (fencing token).
    pub revision: u64,
    /// The host that answered.
    pub host: String,
}

/// The JSON body of a reply.
#[derive(Debug, Serialize, Deserialize)]
struct ReplyBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ok: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    category: Option<String>,
}

/// The longest reply body read (NATS bounds messages too, by default to
/// 1 MiB).
const MAX_REPLY_BYTES: usize = 8 << 20;

impl ClusterClient {
    /// Connect to the NATS server at `url` as a client of the tree whose
    /// root supervisor is `root` (no host: calls only).
    ///
    /// # Errors
    ///
    /// [`JoinError::Connect`] if the server cannot be reached within 5 s.
    pub async fn connect(url: &str, root: &str) -> Result<Self, JoinError> {
        let client = connect(url, "agent-host client").await?;
        Ok(Self {
            client,
            names: ClusterNames::of(root),
            units: Arc::new([]),
            host: None,
        })
    }

    /// The tree's units in the tree file's order (a host's client; empty
    /// for [`connect`](Self::connect)'s).
    pub fn unit_names(&self) -> &[String] {
        &self.units
    }

    /// The host this client belongs to (a host's client).
    pub fn host_id(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Ask the host that runs `unit` for the status of its nodes: one
    /// request, answered only by the unit's current owner while its lease
    /// is valid, within `timeout`.
    ///
    /// # Errors
    ///
    /// [`ClusterCallError`]: no such unit, nobody runs it now (no
    /// responders, or its host is handing it over), no answer within
    /// `timeout`, a malformed answer.
    pub async fn unit_nodes(
        &self,
        unit: &str,
        timeout: Duration,
    ) -> Result<UnitNodes, ClusterCallError> {
        let path = format!("{}/{unit}", self.names.root);
        let subject = call_subject(&self.names, &path)
            .ok_or_else(|| ClusterCallError::BadPath(path.clone()))?;
        let mut headers = HeaderMap::new();
        headers.insert(PATH_HEADER, path.as_str());
        headers.insert(STATUS_HEADER, "nodes");
        let request = async_nats::Request::new()
            .headers(headers)
            .timeout(Some(timeout));
        let failed = |last: &str| ClusterCallError::Timeout {
            path: path.clone(),
            timeout,
            attempts: 1,
            last: last.to_owned(),
        };
        let reply = match self.client.send_request(subject, request).await {
            Ok(reply)
                if reply
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get(RETRY_HEADER).is_some()) =>
            {
                return Err(failed(
                    "its host does not run it right now (a handover, a fence or a restart)",
                ));
            }
            Ok(reply) => reply,
            Err(e) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        failed("no host serves it (no responders)")
                    }
                    async_nats::RequestErrorKind::TimedOut => failed("timed out"),
                    _ => ClusterCallError::Send {
                        path: path.clone(),
                        message: e.to_string(),
                    },
                });
            }
        };
        let reply = parse_reply(&path, &reply)?;
        let json = reply.result.map_err(|error| ClusterCallError::Remote {
            path: path.clone(),
            error,
            category: reply.category,
            host: reply.host.clone(),
        })?;
        let nodes = serde_json::from_str(&json).map_err(|e| ClusterCallError::BadReply {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(UnitNodes {
            host: reply.host,
            incarnation: reply.incarnation,
            revision: reply.revision,
            nodes,
        })
    }

    /// Ask host `host` to hand all its units over (and take none any
    /// more); the units it handed over.
    ///
    /// # Errors
    ///
    /// [`ClusterCallError`]: no such host listening, no answer within
    /// `timeout`, a malformed answer.
    pub async fn drain(
        &self,
        host: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, ClusterCallError> {
        let subject = format!("{}.{}", self.names.drain, token(host));
        let request = async_nats::Request::new().timeout(Some(timeout));
        let what = format!("host {host}");
        let reply = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| ClusterCallError::Send {
                path: what.clone(),
                message: match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        "no such host in the cluster (nobody listens)".into()
                    }
                    _ => e.to_string(),
                },
            })?;
        serde_json::from_slice(&reply.payload).map_err(|e| ClusterCallError::BadReply {
            path: what,
            message: e.to_string(),
        })
    }

    /// The leases bucket (a joining host creates it).
    async fn leases(&self) -> Result<kv::Store, JoinError> {
        async_nats::jetstream::new(self.client.clone())
            .get_key_value(&self.names.leases)
            .await
            .map_err(|e| self.leases_error(e))
    }

    /// The error of an operation on the leases bucket.
    fn leases_error(&self, error: impl std::fmt::Display) -> JoinError {
        JoinError::Bucket {
            bucket: self.names.leases.clone(),
            message: error.to_string(),
        }
    }

    /// Who holds the lease of each of `units`, as the leases bucket says
    /// now (a holder that died keeps it until it expires).
    ///
    /// # Errors
    ///
    /// [`JoinError::Bucket`] if the bucket cannot be read.
    pub async fn units(&self, units: &[String]) -> Result<Vec<UnitStatus>, JoinError> {
        let store = self.leases().await?;
        let mut out = Vec::with_capacity(units.len());
        for unit in units {
            let entry = store
                .entry(lease_key(unit))
                .await
                .map_err(|e| self.leases_error(e))?;
            let (holder, revision) = match entry {
                Some(e) if e.operation == Operation::Put => {
                    (serde_json::from_slice(&e.value).ok(), e.revision)
                }
                Some(e) => (None, e.revision),
                None => (None, 0),
            };
            out.push(UnitStatus {
                unit: unit.clone(),
                holder,
                revision,
            });
        }
        Ok(out)
    }

    /// The hosts that have said they are in the cluster (at most
    /// [`MAX_HOSTS`]), by host id, each with the units of `units` it holds
    /// (from [`units`](Self::units)). A host that stopped gracefully has
    /// deleted its record; one that was killed is listed, not live, until
    /// a host of that id joins again.
    ///
    /// # Errors
    ///
    /// [`JoinError::Bucket`] if the bucket cannot be read.
    pub async fn hosts(&self, units: &[UnitStatus]) -> Result<Vec<HostStatus>, JoinError> {
        let store = self.leases().await?;
        let mut keys = store.keys().await.map_err(|e| self.leases_error(e))?;
        let mut host_keys = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.leases_error(e))?;
            if key.starts_with("host.") {
                host_keys.push(key);
                if host_keys.len() >= MAX_HOSTS {
                    break;
                }
            }
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(host_keys.len());
        for key in host_keys {
            let Some(value) = store.get(key).await.map_err(|e| self.leases_error(e))? else {
                continue;
            };
            if value.len() > MAX_HOST_RECORD_BYTES {
                continue;
            }
            let Ok(record) = serde_json::from_slice::<HostRecord>(&value) else {
                continue;
            };
            let live = now.saturating_sub(record.at_ms) <= record.ttl_ms;
            let held = units
                .iter()
                .filter(|u| u.holder.as_ref().is_some_and(|h| h.host == record.host))
                .map(|u| u.unit.clone())
                .collect();
            out.push(HostStatus {
                record,
                live,
                units: held,
            });
        }
        out.sort_by(|a, b| a.record.host.cmp(&b.record.host));
        Ok(out)
    }

    /// The cluster's shared restart history (takeovers and crashes of
    /// units), oldest first.
    ///
    /// # Errors
    ///
    /// [`HistoryError`] if the bucket cannot be read.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>, HistoryError> {
        let js = async_nats::jetstream::new(self.client.clone());
        match js.get_key_value(&self.names.history).await {
            Ok(store) => Ok(history::read(&store).await?.0),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// The unit a path belongs to (`root/unit/...` -> `unit`).
    fn unit_of<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(&self.names.root)?.strip_prefix('/')?;
        let unit = rest.split('/').next()?;
        (!unit.is_empty()).then_some(unit)
    }

    /// Call the agent at `path` (`root/unit/...`, a full path) with
    /// `message`, wherever its unit runs; retried while nobody serves it,
    /// until `timeout`. `call_id` is sent with every attempt (a new UUID if
    /// none).
    ///
    /// # Errors
    ///
    /// [`ClusterCallError`]: a bad path, no reply in time, a malformed
    /// reply. An agent's own error is an `Ok` reply whose `result` is
    /// `Err`.
    pub async fn call(
        &self,
        path: &str,
        message: &str,
        timeout: Duration,
        call_id: Option<&str>,
    ) -> Result<ClusterReply, ClusterCallError> {
        let path = path.trim_matches('/');
        let Some(unit) = self.unit_of(path) else {
            return Err(ClusterCallError::BadPath(path.to_owned()));
        };
        if !self.units.is_empty() && !self.units.iter().any(|u| u == unit) {
            return Err(ClusterCallError::NoSuchUnit {
                unit: unit.to_owned(),
                units: self.units.to_vec(),
            });
        }
        let subject = call_subject(&self.names, path)
            .ok_or_else(|| ClusterCallError::BadPath(path.to_owned()))?;
        let call_id = call_id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let deadline = Instant::now() + timeout;
        let mut attempts = 0u32;
        let mut pause = Duration::from_millis(5);
        let mut last = String::from("none sent");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClusterCallError::Timeout {
                    path: path.to_owned(),
                    timeout,
                    attempts,
                    last,
                });
            }
            let mut headers = HeaderMap::new();
            headers.insert(CALL_ID_HEADER, call_id.as_str());
            headers.insert(PATH_HEADER, path);
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(Bytes::copy_from_slice(message.as_bytes()))
                .timeout(Some(left));
            attempts += 1;
            match self.client.send_request(subject.clone(), request).await {
                Ok(reply)
                    if reply
                        .headers
                        .as_ref()
                        .is_some_and(|h| h.get(RETRY_HEADER).is_some()) =>
                {
                    last = "the host no longer runs it (handover)".into();
                }
                Ok(reply) => return parse_reply(path, &reply),
                Err(e) => match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        last = "no host serves it (no responders)".into();
                    }
                    async_nats::RequestErrorKind::TimedOut => {
                        last = "timed out".into();
                    }
                    _ => {
                        return Err(ClusterCallError::Send {
                            path: path.to_owned(),
                            message: e.to_string(),
                        });
                    }
                },
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

fn parse_reply(path: &str, reply: &async_nats::Message) -> Result<ClusterReply, ClusterCallError> {
    let bad = |message: String| ClusterCallError::BadReply {
        path: path.to_owned(),
        message,
    };
    if reply.payload.len() > MAX_REPLY_BYTES {
        return Err(bad(format!("{} bytes", reply.payload.len())));
    }
    let body: ReplyBody =
        serde_json::from_slice(&reply.payload).map_err(|e| bad(format!("not JSON: {e}")))?;
    let header = |name: &str| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let incarnation = header(INCARNATION_HEADER).ok_or_else(|| bad("no incarnation".into()))?;
    let revision = header(REVISION_HEADER)
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| bad("no lease revision".into()))?;
    let host = header(HOST_HEADER).unwrap_or_default();
    let result = match (body.ok, body.error) {
        (Some(ok), None) => Ok(ok),
        (None, Some(error)) => Err(error),
        _ => return Err(bad("neither `ok` nor `error`".into())),
    };
    Ok(ClusterReply {
        result,
        category: body.category,
        incarnation,
        revision,
        host,
    })
}

async fn connect(url: &str, name: &str) -> Result<async_nats::Client, JoinError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await
        .map_err(|source| JoinError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// What the lease manager asks a unit's runner to do.
enum Command {
    Start {
        incarnation: String,
        revision: u64,
        gate: Arc<UnitGate>,
    },
    /// Stop the unit; answered once it stopped.
    Stop { done: oneshot::Sender<()> },
    /// The first half of a restart by the root's strategy: stop the unit's
    /// subtree (keeping the lease; calls meanwhile are told to try again),
    /// if `incarnation` still runs it here. Answered once it stopped.
    Halt {
        incarnation: String,
        done: oneshot::Sender<()>,
    },
    /// The second half: start the subtree again, if it was halted by
    /// `Halt` for `incarnation` and nothing stopped the unit since.
    Resume {
        incarnation: String,
        cause: String,
        done: oneshot::Sender<()>,
    },
}

/// What a runner tells the lease manager.
enum RunnerNote {
    StartFailed { unit: String },
}

/// A host of the cluster: the local part of the tree (the root supervisor
/// and the units this host won), the lease manager and the call servers.
pub struct ClusterHost {
    tree: RunningTree,
    client: ClusterClient,
    host_id: String,
    gates: Arc<Mutex<Gates>>,
    events: broadcast::Sender<ClusterEvent>,
    cancel: CancellationToken,
    manager: Option<JoinHandle<()>>,
    lease_ttl: Duration,
    halted: tokio::sync::watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for ClusterHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHost")
            .field("host_id", &self.host_id)
            .field("root", &self.client.names.root)
            .finish_non_exhaustive()
    }
}

/// Everything the lease manager works with.
struct Manager {
    client: async_nats::Client,
    /// Where `agent-host cluster drain` asks this host to hand its units
    /// over.
    drain_subject: String,
    leases: kv::Store,
    history: kv::Store,
    intensity: RestartIntensity,
    session: String,
    /// Set once the root gave up, on any host.
    halted: tokio::sync::watch::Sender<Option<String>>,
    /// The restart-history writes in progress.
    tasks: tokio::task::JoinSet<()>,
    /// The root supervisor's name (the units' paths are `root/unit`).
    root: String,
    /// The root's strategy, applied across hosts (the local roots are
    /// `one_for_one`: what a restart of a unit restarts with it is decided
    /// here, from the shared history).
    strategy: RestartStrategy,
    /// The ids of the history's entries this host has seen (at most
    /// [`MAX_ENTRIES`]: those in the history when last read).
    restarts_seen: HashSet<String>,
    /// Per lost session in the history, the position (in the tree file)
    /// of the earliest of its units the root's strategy was applied from.
    takeovers_applied: HashMap<String, usize>,
    /// The restarts by the root's strategy to do here, done one after
    /// another (in the history's order) by a task of their own, so that
    /// the leases are renewed meanwhile.
    restart_queue: Option<mpsc::Sender<RestartGroup>>,
    /// The local tree's events: the root's restarts of the units run here
    /// go to the shared history.
    tree_events: Option<broadcast::Receiver<SupervisorEvent>>,
    host_id: String,
    /// This host's labels, for its record.
    labels: BTreeMap<String, String>,
    /// When this host's record was last written (renewed every `T/4`).
    presence_sent: Option<Instant>,
    /// Whether this host was drained (it takes no unit).
    draining: bool,
    ttl: Duration,
    units: Vec<UnitLease>,
    notes: mpsc::Receiver<RunnerNote>,
    events: broadcast::Sender<ClusterEvent>,
    cancel: CancellationToken,
}

/// One unit as the lease manager sees it.
struct UnitLease {
    name: String,
    key: String,
    /// Whether this host may run it (labels).
    eligible: bool,
    state: LeaseState,
    /// Not before this instant will this host try to take it (after a
    /// failed start here).
    cool_off_until: Option<Instant>,
    /// The delay after expiry before this host tries (rendezvous rank).
    delay: Duration,
    /// When this host last wrote (or tried to write) the lease, if that
    /// failed or was a renewal: the next attempt waits a little.
    last_try: Option<Instant>,
    /// What the lease held when this host last saw it held by another.
    holder: Option<LeaseRecord>,
    gate: Arc<UnitGate>,
    runner: mpsc::Sender<Command>,
    runner_task: JoinHandle<()>,
    /// The session of the lost host this host took the unit over from
    /// (its current incarnation here), if it was a takeover: the root's
    /// strategy does not restart it again for that lost host.
    taken_from: Option<String>,
}

enum LeaseState {
    /// Nobody holds it: the revision of its delete marker (0 if the key
    /// never existed).
    Free { revision: u64 },
    /// Another host holds it (or held it when we looked): its revision and
    /// when this host saw that revision appear.
    Other {
        revision: u64,
        seen: Instant,
        host: String,
    },
    /// This host holds it.
    Owned {
        revision: u64,
        incarnation: String,
        record: Bytes,
        /// When the last successful write (create or renewal) was sent.
        sent: Instant,
    },
}

impl ClusterHost {
    /// Join the cluster at `options.url` with the tree `tree`: check that
    /// the cluster runs the same tree file, start the root supervisor here
    /// (without children), and start competing for the units' leases. The
    /// agents' state is kept in the tree's state bucket (authoritative in
    /// cluster mode), fenced by the units' leases.
    ///
    /// # Errors
    ///
    /// [`JoinError`]: a bad host id, no server, no JetStream, a different
    /// tree file, components that do not load.
    pub async fn join(
        options: ClusterOptions,
        tree: &TreeFile,
        runtime: &Runtime,
    ) -> Result<Self, JoinError> {
        if !valid_label(&options.host_id) || options.host_id.len() > MAX_HOST_ID {
            return Err(JoinError::HostId(options.host_id));
        }
        let names = ClusterNames::of(&tree.root.name);
        let ttl = tree.cluster.lease_ttl;
        let client = connect(&options.url, &format!("agent-host {}", options.host_id)).await?;
        let mut lease_js = async_nats::jetstream::new(client.clone());
        // A renewal that takes longer than T/8 is as good as lost.
        lease_js.set_timeout((ttl / 8).max(Duration::from_millis(50)));
        let mut state_js = async_nats::jetstream::new(client.clone());
        state_js.set_timeout(Duration::from_secs(5));
        let leases = bucket(&lease_js, &names.leases, 1).await?;
        let state_bucket = bucket(&state_js, &names.state, 1).await?;
        let history = bucket(&state_js, &names.history, 1).await?;
        check_tree_hash(&leases, tree, &names).await?;
        if let Ok(Some(reason)) = leases.get(history::HALT_KEY).await {
            return Err(JoinError::Halted {
                reason: String::from_utf8_lossy(&reason).into_owned(),
                bucket: names.leases.clone(),
            });
        }

        let gates = Arc::new(Mutex::new(Gates::default()));
        let state = Arc::new(KvStateStore::new(
            state_bucket,
            tokio::runtime::Handle::current(),
            gates.clone(),
            StateQuota::default(),
        ));
        // The local root restarts only the unit that exited: the root's
        // strategy is applied across hosts by the lease manager, from the
        // shared history, to each host's units in the tree file's order.
        let mut local = tree.clone();
        local.root.policy.strategy = RestartStrategy::OneForOne;
        let (root, units) = local.build_units(runtime, state.clone())?;
        let running = RunningTree::start(root).await?;
        let handle = running.handle();
        // Before any unit starts here: no restart of one is missed.
        let tree_events = running.subscribe();
        let (events, _) = broadcast::channel(1024);
        let cancel = CancellationToken::new();
        let cluster_client = ClusterClient {
            client: client.clone(),
            names: names.clone(),
            units: units.iter().map(|(name, _)| name.clone()).collect(),
            host: Some(options.host_id.clone()),
        };
        let (notes_tx, notes_rx) = mpsc::channel(64);
        let mut unit_leases = Vec::with_capacity(units.len());
        for (name, spec) in units {
            let gate = Arc::new(UnitGate::default());
            gates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .by_unit
                .insert(name.clone(), gate.clone());
            state.register_spec(&name, &spec);
            let (tx, rx) = mpsc::channel(32);
            let runner = Runner {
                unit: name.clone(),
                spec,
                tree: handle.clone(),
                client: client.clone(),
                names: names.clone(),
                host_id: options.host_id.clone(),
                events: events.clone(),
                notes: notes_tx.clone(),
            };
            let runner_task = tokio::spawn(runner.run(rx));
            let required = tree.cluster.placement.get(&name);
            let eligible = required.is_none_or(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| options.labels.get(k).is_some_and(|ours| ours == v))
            });
            let delay = rendezvous_delay(&name, &options.host_id, ttl);
            unit_leases.push(UnitLease {
                key: lease_key(&name),
                name,
                eligible,
                state: LeaseState::Free { revision: 0 },
                cool_off_until: None,
                delay,
                last_try: None,
                holder: None,
                gate,
                runner: tx,
                runner_task,
                taken_from: None,
            });
        }
        let (halted_tx, halted) = tokio::sync::watch::channel(None);
        let manager = Manager {
            client: client.clone(),
            drain_subject: format!("{}.{}", names.drain, token(&options.host_id)),
            leases,
            history,
            intensity: tree.root.policy.intensity.clone(),
            session: uuid::Uuid::new_v4().to_string(),
            halted: halted_tx,
            tasks: tokio::task::JoinSet::new(),
            root: names.root.clone(),
            strategy: tree.root.policy.strategy,
            restarts_seen: HashSet::new(),
            takeovers_applied: HashMap::new(),
            restart_queue: None,
            tree_events: Some(tree_events),
            host_id: options.host_id.clone(),
            labels: options.labels.clone(),
            presence_sent: None,
            draining: false,
            ttl,
            units: unit_leases,
            notes: notes_rx,
            events: events.clone(),
            cancel: cancel.clone(),
        };
        let manager = tokio::spawn(manager.run());
        Ok(Self {
            tree: running,
            client: cluster_client,
            host_id: options.host_id,
            gates,
            events,
            cancel,
            manager: Some(manager),
            lease_ttl: ttl,
            halted,
        })
    }

    /// The local part of the tree: the root and the units this host runs.
    pub fn tree(&self) -> TreeHandle {
        self.tree.handle()
    }

    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The lease time of the tree's units.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// A client for calls by path anywhere in the cluster.
    pub fn client(&self) -> &ClusterClient {
        &self.client
    }

    /// The root supervisor gives up on every host of the cluster (as when
    /// this host's root exceeded its restart intensity): the key `halt`
    /// stops every host's units, and hosts that join later are refused.
    ///
    /// # Errors
    ///
    /// [`JoinError::Bucket`] if the key cannot be written.
    pub async fn halt(&self, reason: &str) -> Result<(), JoinError> {
        self.client
            .leases()
            .await?
            .put(
                history::HALT_KEY,
                Bytes::from(format!("{reason} (on host {})", self.host_id)),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.client.leases_error(e))
    }

    /// Why the tree's root gave up on the cluster (on any host), if it did.
    pub fn halted(&self) -> Option<String> {
        self.halted.borrow().clone()
    }

    /// Wait until the tree's root gives up on the cluster; why. This host
    /// has then stopped its units (call [`shutdown`](Self::shutdown)).
    pub async fn wait_halted(&self) -> String {
        let mut halted = self.halted.clone();
        match halted.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The manager is gone: nothing will halt any more.
            Err(_) => std::future::pending().await,
        }
    }

    /// The units' lease events on this host.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.events.subscribe()
    }

    /// Call the agent at `path` (a full path, `root/unit/...`): in this
    /// process if its unit runs here (and its lease is valid), otherwise
    /// over NATS to the host that runs it.
    ///
    /// # Errors
    ///
    /// As [`ClusterClient::call`]; a local call's failure is
    /// [`ClusterCallError::Local`].
    pub async fn call(
        &self,
        path: &str,
        message: &str,
        timeout: Duration,
    ) -> Result<String, ClusterCallError> {
        let path = path.trim_matches('/');
        let unit = self
            .client
            .unit_of(path)
            .ok_or_else(|| ClusterCallError::BadPath(path.to_owned()))?;
        let local = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .gate(unit)
            .is_some_and(|g| g.is_open());
        if local {
            let handle = self.tree.handle();
            return match tokio::time::timeout(timeout, handle.call(path, message.to_owned())).await
            {
                Ok(result) => Ok(result?),
                Err(_) => Err(ClusterCallError::Timeout {
                    path: path.to_owned(),
                    timeout,
                    attempts: 1,
                    last: "the local agent did not answer".into(),
                }),
            };
        }
        let reply = self.client.call(path, message, timeout, None).await?;
        reply.result.map_err(|error| ClusterCallError::Remote {
            path: path.to_owned(),
            error,
            category: reply.category,
            host: reply.host,
        })
    }

    /// Leave the cluster gracefully: stop every unit this host runs and
    /// delete its lease, so that other hosts take it over at once; then
    /// stop the local tree.
    ///
    /// # Errors
    ///
    /// The local tree's stop error, if any.
    pub async fn shutdown(mut self) -> crate::SupervisionResult<()> {
        self.cancel.cancel();
        if let Some(manager) = self.manager.take() {
            let _ = manager.await;
        }
        self.tree.stop().await
    }
}

impl Drop for ClusterHost {
    fn drop(&mut self) {
        // Without `shutdown`, the manager stops renewing: the leases expire
        // and other hosts take the units over.
        self.cancel.cancel();
        if let Some(manager) = self.manager.take() {
            manager.abort();
        }
    }
}

/// A host's delay before it tries to take over an expired unit: its rank
/// by rendezvous hashing, spread over `T/40`, so that the preferred host
/// (the smallest hash) tries first and the others rarely collide with it
/// (a collision costs one failed compare-and-set, never two owners).
fn rendezvous_delay(unit: &str, host: &str, ttl: Duration) -> Duration {
    let digest = Sha256::digest(format!("{unit}\0{host}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let fraction = u64::from_be_bytes(first) as f64 / u64::MAX as f64;
    (ttl / 40).mul_f64(fraction)
}

/// The cluster's hosts must run the same tree file: its hash is kept under
/// the key `tree` (the first host writes it).
async fn check_tree_hash(
    leases: &kv::Store,
    tree: &TreeFile,
    names: &ClusterNames,
) -> Result<(), JoinError> {
    let text = tokio::fs::read(&tree.path)
        .await
        .map_err(|source| JoinError::ReadTree {
            path: tree.path.clone(),
            source,
        })?;
    let ours: String = Sha256::digest(&text)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let bucket_error = |message: String| JoinError::Bucket {
        bucket: names.leases.clone(),
        message,
    };
    match leases.create("tree", Bytes::from(ours.clone())).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let theirs = leases
                .get("tree")
                .await
                .map_err(|e| bucket_error(e.to_string()))?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            if theirs == ours {
                Ok(())
            } else {
                Err(JoinError::TreeDiffers {
                    ours,
                    theirs,
                    bucket: names.leases.clone(),
                })
            }
        }
        Err(e) => Err(bucket_error(e.to_string())),
    }
}

impl Manager {
    async fn run(mut self) {
        let tick = (self.ttl / 16).max(Duration::from_millis(10));
        // The watch first, then the current values: no change is missed.
        let mut watch = match self.leases.watch_all().await {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!("cluster: cannot watch the leases: {e}; retrying");
                None
            }
        };
        self.read_all().await;
        self.renew_presence().await;
        // The history's watch first, then what it holds now (seen before
        // this host ran any unit: nothing of it is applied here).
        let mut restarts = self.history.watch(history::ENTRIES_KEY).await.ok();
        if let Ok((entries, _)) = history::read(&self.history).await {
            self.restarts_seen = entries.into_iter().map(|e| e.id).collect();
        }
        let (queue, mut queued) = mpsc::channel::<RestartGroup>(MAX_ENTRIES);
        self.restart_queue = Some(queue);
        let restarter = tokio::spawn(async move {
            while let Some(group) = queued.recv().await {
                restart_group(group).await;
            }
        });
        let mut drains = match self.client.subscribe(self.drain_subject.clone()).await {
            Ok(drains) => Some(drains),
            Err(e) => {
                tracing::warn!("cluster: cannot listen for drain requests: {e}");
                None
            }
        };
        loop {
            // Wake at the next renewal, fence or expiry due (at least every
            // `tick`, and never more often than every millisecond while an
            // operation keeps failing at once).
            let wake = self
                .next_due()
                .min(Instant::now() + tick)
                .max(Instant::now() + Duration::from_millis(1));
            while self.tasks.try_join_next().is_some() {}
            if self.halted.borrow().is_some() {
                break;
            }
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = tokio::time::sleep_until(wake.into()) => {
                    if watch.is_none()
                        && let Ok(w) = self.leases.watch_all().await
                    {
                        watch = Some(w);
                        self.read_all().await;
                    }
                    if restarts.is_none()
                        && let Ok(w) = self.history.watch(history::ENTRIES_KEY).await
                    {
                        restarts = Some(w);
                        // What was written while the watch was lost.
                        if let Ok((entries, _)) = history::read(&self.history).await {
                            self.saw_history(entries);
                        }
                    }
                    self.step().await;
                }
                request = next_message(&mut drains) => match request {
                    Some(request) => self.drain(request).await,
                    None => drains = None,
                },
                entry = next_entry(&mut restarts) => match entry {
                    Some(Ok(entry)) if entry.operation == Operation::Put => {
                        match serde_json::from_slice(&entry.value) {
                            Ok(entries) => self.saw_history(entries),
                            Err(e) => tracing::warn!("cluster: the restart history is unreadable: {e}"),
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!("cluster: the restart history's watch failed: {e}; watching again");
                        restarts = None;
                    }
                    None => restarts = None,
                },
                event = next_tree_event(&mut self.tree_events) => match event {
                    Some(event) => self.saw_tree_event(&event),
                    None => self.tree_events = None,
                },
                note = self.notes.recv() => {
                    if let Some(RunnerNote::StartFailed { unit }) = note {
                        self.release(&unit, true).await;
                    }
                }
                entry = next_entry(&mut watch) => match entry {
                    Some(Ok(entry)) => self.saw(&entry),
                    Some(Err(e)) => {
                        tracing::warn!("cluster: the leases watch failed: {e}; watching again");
                        watch = None;
                    }
                    None => watch = None,
                },
            }
        }
        // Graceful: stop each unit run here, then delete its lease.
        let names: Vec<String> = self
            .units
            .iter()
            .filter(|u| matches!(u.state, LeaseState::Owned { .. }))
            .map(|u| u.name.clone())
            .collect();
        for unit in names {
            self.release(&unit, false).await;
        }
        while self.tasks.join_next().await.is_some() {}
        // What is still queued finds its units stopped: nothing happens.
        self.restart_queue = None;
        let _ = restarter.await;
        // Gone gracefully: no longer listed.
        if self.presence_sent.is_some() {
            let _ = self.leases.delete(host_key(&self.host_id)).await;
        }
        for unit in self.units {
            drop(unit.runner);
            let _ = unit.runner_task.await;
        }
    }

    /// When the next renewal, fence or takeover attempt is due.
    fn next_due(&self) -> Instant {
        let now = Instant::now();
        let far = self
            .presence_sent
            .map_or(now, |sent| sent + self.ttl / 4)
            .min(now + self.ttl);
        // After a failed attempt, the next one waits a little.
        let retry = self.ttl / 32;
        self.units
            .iter()
            .map(|unit| {
                let due = match &unit.state {
                    LeaseState::Owned { sent, .. } => *sent + self.ttl / 4,
                    _ if !unit.eligible => far,
                    LeaseState::Free { .. } => unit.cool_off_until.unwrap_or(now),
                    LeaseState::Other { seen, .. } => {
                        let expiry = *seen + self.ttl + unit.delay;
                        unit.cool_off_until.map_or(expiry, |c| c.max(expiry))
                    }
                };
                unit.last_try.map_or(due, |t| due.max(t + retry))
            })
            .min()
            .unwrap_or(far)
    }

    /// Read every unit's lease (at start, and after the watch was lost).
    async fn read_all(&mut self) {
        let now = Instant::now();
        for unit in &mut self.units {
            if matches!(unit.state, LeaseState::Owned { .. }) {
                continue;
            }
            match self.leases.entry(unit.key.clone()).await {
                Ok(None) => unit.state = LeaseState::Free { revision: 0 },
                Ok(Some(entry)) => unit.observe(&entry, now),
                Err(e) => tracing::warn!("cluster: cannot read the lease of {}: {e}", unit.name),
            }
        }
    }

    /// A change of a lease seen on the watch.
    fn saw(&mut self, entry: &kv::Entry) {
        if entry.key == history::HALT_KEY && entry.operation == Operation::Put {
            let reason = String::from_utf8_lossy(&entry.value).into_owned();
            self.halted.send_replace(Some(reason));
            return;
        }
        let Some(unit) = self.units.iter_mut().find(|u| u.key == entry.key) else {
            return;
        };
        match &unit.state {
            LeaseState::Owned { revision, .. } if entry.revision <= *revision => {}
            LeaseState::Owned { incarnation, .. } => {
                // Someone else wrote our lease: we lost it.
                let incarnation = incarnation.clone();
                unit.fence(&self.events, &incarnation, "another host wrote the lease");
                unit.observe(entry, Instant::now());
            }
            LeaseState::Other { revision, .. } | LeaseState::Free { revision }
                if entry.revision <= *revision => {}
            _ => {
                unit.observe(entry, Instant::now());
                unit.last_try = None;
            }
        }
    }

    /// Write this host's record (see [`HostRecord`]) if it is due.
    async fn renew_presence(&mut self) {
        let now = Instant::now();
        if self
            .presence_sent
            .is_some_and(|sent| now < sent + self.ttl / 4)
        {
            return;
        }
        self.presence_sent = Some(now);
        let record = HostRecord {
            host: self.host_id.clone(),
            labels: self.labels.clone(),
            session: self.session.clone(),
            ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
            at_ms: now_ms(),
            draining: self.draining,
        };
        let Ok(bytes) = serde_json::to_vec(&record) else {
            return;
        };
        if let Err(e) = self
            .leases
            .put(host_key(&self.host_id), Bytes::from(bytes))
            .await
        {
            tracing::debug!("cluster: cannot renew this host's record: {e}");
        }
    }

    /// Renew what is due, fence what could not be renewed in time, try to
    /// take what is free or expired.
    async fn step(&mut self) {
        self.renew_presence().await;
        let ttl = self.ttl;
        for i in 0..self.units.len() {
            let now = Instant::now();
            let unit = &mut self.units[i];
            match &unit.state {
                LeaseState::Owned {
                    revision,
                    incarnation,
                    record,
                    sent,
                } => {
                    if now >= *sent + ttl * 3 / 4 {
                        let incarnation = incarnation.clone();
                        unit.fence(
                            &self.events,
                            &incarnation,
                            "the lease could not be renewed in time",
                        );
                        unit.state = LeaseState::Other {
                            revision: *revision,
                            seen: now,
                            host: self.host_id.clone(),
                        };
                        continue;
                    }
                    if now < *sent + ttl / 4 {
                        continue;
                    }
                    let (revision, record, incarnation) =
                        (*revision, record.clone(), incarnation.clone());
                    let sending = Instant::now();
                    unit.last_try = Some(sending);
                    match self
                        .leases
                        .update(unit.key.clone(), record.clone(), revision)
                        .await
                    {
                        Ok(new) => {
                            unit.last_try = None;
                            unit.gate.set(Some(sending + ttl * 3 / 4));
                            unit.state = LeaseState::Owned {
                                revision: new,
                                incarnation,
                                record,
                                sent: sending,
                            };
                        }
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            unit.fence(&self.events, &incarnation, "another host holds the lease");
                            unit.state = LeaseState::Other {
                                revision,
                                seen: Instant::now(),
                                host: String::new(),
                            };
                        }
                        Err(e) => {
                            tracing::warn!("cluster: cannot renew the lease of {}: {e}", unit.name);
                        }
                    }
                }
                LeaseState::Free { revision } => {
                    let revision = *revision;
                    if unit.may_try(now) {
                        self.acquire(i, revision, false).await;
                    }
                }
                LeaseState::Other {
                    revision,
                    seen,
                    host,
                } => {
                    let revision = *revision;
                    // The lease expired: its holder was lost (unless it was
                    // this very session, fenced and coming back).
                    let lost = unit
                        .holder
                        .as_ref()
                        .is_none_or(|h| h.session != self.session)
                        || *host != self.host_id;
                    if now >= *seen + ttl + unit.delay && unit.may_try(now) {
                        self.acquire(i, revision, lost).await;
                    }
                }
            }
        }
    }

    /// Try to win unit `i`'s lease by compare-and-set on `revision`.
    async fn acquire(&mut self, i: usize, revision: u64, takeover: bool) {
        let ttl = self.ttl;
        let unit = &mut self.units[i];
        let incarnation = uuid::Uuid::new_v4().to_string();
        let record = LeaseRecord {
            host: self.host_id.clone(),
            incarnation: incarnation.clone(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            since_ms: now_ms(),
            session: self.session.clone(),
        };
        let Ok(record) = serde_json::to_vec(&record) else {
            return;
        };
        let record = Bytes::from(record);
        let sending = Instant::now();
        unit.last_try = Some(sending);
        match self
            .leases
            .update(unit.key.clone(), record.clone(), revision)
            .await
        {
            Ok(new) => {
                unit.gate.set(Some(sending + ttl * 3 / 4));
                unit.state = LeaseState::Owned {
                    revision: new,
                    incarnation: incarnation.clone(),
                    record,
                    sent: sending,
                };
                let _ = self.events.send(ClusterEvent::Acquired {
                    unit: unit.name.clone(),
                    incarnation: incarnation.clone(),
                    revision: new,
                    takeover,
                });
                // A unit whose host was lost restarts here: a restart of the
                // root's, in the shared history.
                let holder = unit.holder.take();
                unit.taken_from = None;
                if let Some(lost) = holder.filter(|h| takeover && h.session != self.session) {
                    unit.taken_from = Some(lost.session.clone());
                    let entry = HistoryEntry {
                        id: uuid::Uuid::new_v4().to_string(),
                        kind: RestartKind::Takeover,
                        at_ms: now_ms(),
                        unit: unit.name.clone(),
                        lost_host: lost.host,
                        lost_session: lost.session,
                        by_host: self.host_id.clone(),
                        incarnation: incarnation.clone(),
                        counted: false,
                    };
                    let (history, leases, intensity) = (
                        self.history.clone(),
                        self.leases.clone(),
                        self.intensity.clone(),
                    );
                    self.tasks.spawn(async move {
                        record_restart(&history, &leases, entry, intensity).await;
                    });
                }
                let command = Command::Start {
                    incarnation,
                    revision: new,
                    gate: unit.gate.clone(),
                };
                if unit.runner.send(command).await.is_err() {
                    tracing::warn!("cluster: the runner of {} is gone", unit.name);
                }
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Someone else won: the watch will say who.
                if let Ok(Some(entry)) = self.leases.entry(unit.key.clone()).await
                    && entry.revision > revision
                {
                    unit.observe(&entry, Instant::now());
                }
            }
            Err(e) => tracing::debug!("cluster: cannot take the lease of {}: {e}", unit.name),
        }
    }

    /// An event of the local tree: a unit run here that exited and was
    /// restarted here by the local root is a restart of the cluster's root,
    /// recorded in the shared history (so that the root's intensity is
    /// judged once over the cluster). A bystander restarted with it is not
    /// another restart (OTP counts the exit, not the children restarted).
    fn saw_tree_event(&mut self, event: &SupervisorEvent) {
        let EventKind::ChildRestarted {
            bystander: false, ..
        } = &event.kind
        else {
            return;
        };
        let Some(unit) = event
            .path
            .strip_prefix(self.root.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|name| self.units.iter().find(|u| u.name == name))
        else {
            return;
        };
        let incarnation = match &unit.state {
            LeaseState::Owned { incarnation, .. } => incarnation.clone(),
            _ => String::new(),
        };
        let entry = HistoryEntry {
            id: uuid::Uuid::new_v4().to_string(),
            kind: RestartKind::Crash,
            at_ms: now_ms(),
            unit: unit.name.clone(),
            lost_host: self.host_id.clone(),
            lost_session: self.session.clone(),
            by_host: self.host_id.clone(),
            incarnation,
            counted: true,
        };
        let (history, leases, intensity) = (
            self.history.clone(),
            self.leases.clone(),
            self.intensity.clone(),
        );
        self.tasks.spawn(async move {
            record_restart(&history, &leases, entry, intensity).await;
        });
    }

    /// The shared history as it is now: apply the root's strategy to each
    /// restart this host has not seen yet. A crash is one restart. The
    /// takeovers of the units of one lost host (one session) are one
    /// restart too: the strategy is applied from the first of them seen,
    /// and for `rest_for_one`, once more for the units between a later
    /// one that comes earlier in the tree file and the ones already
    /// covered. The lost host's units themselves are not restarted again:
    /// each starts afresh where it is taken over.
    fn saw_history(&mut self, entries: Vec<HistoryEntry>) {
        let new: Vec<&HistoryEntry> = entries
            .iter()
            .filter(|e| !e.id.is_empty() && !self.restarts_seen.contains(&e.id))
            .collect();
        for entry in new {
            let Some(at) = self.units.iter().position(|u| u.name == entry.unit) else {
                continue;
            };
            let (upto, lost, session) = match entry.kind {
                RestartKind::Crash => (None, HashSet::new(), None),
                RestartKind::Takeover => {
                    let upto = match self.takeovers_applied.get(&entry.lost_session) {
                        None => None,
                        Some(&covered) if at < covered => Some(covered),
                        Some(_) => continue,
                    };
                    self.takeovers_applied
                        .insert(entry.lost_session.clone(), at);
                    let lost = entries
                        .iter()
                        .filter(|e| {
                            e.kind == RestartKind::Takeover && e.lost_session == entry.lost_session
                        })
                        .map(|e| e.unit.clone())
                        .collect();
                    (upto, lost, Some(entry.lost_session.as_str()))
                }
            };
            self.restart_affected(at, upto, &lost, session);
        }
        self.takeovers_applied
            .retain(|session, _| entries.iter().any(|e| &e.lost_session == session));
        self.restarts_seen = entries.into_iter().map(|e| e.id).collect();
    }

    /// The root's strategy across hosts: unit `at` was restarted (it
    /// crashed and its host restarted it, or it was taken over); restart
    /// the units the strategy restarts with it that this host runs (every
    /// other unit for `one_for_all`, those after it in the tree file for
    /// `rest_for_one`, before unit `upto` if given; none of `skip`, and
    /// none this host took over from `lost_session`): stopped in reverse
    /// start order, then started in start order, each keeping its lease.
    /// Done by a task, so that the leases are renewed meanwhile.
    fn restart_affected(
        &mut self,
        at: usize,
        upto: Option<usize>,
        skip: &HashSet<String>,
        lost_session: Option<&str>,
    ) {
        let affected = match (self.strategy, upto) {
            (RestartStrategy::OneForOne, _) | (RestartStrategy::OneForAll, Some(_)) => return,
            (RestartStrategy::OneForAll, None) => 0..self.units.len(),
            (RestartStrategy::RestForOne, upto) => at + 1..upto.unwrap_or(self.units.len()),
        };
        let cause = self.units[at].name.clone();
        let targets: Vec<RestartTarget> = affected
            .filter(|&i| i != at)
            .filter_map(|i| {
                let unit = &self.units[i];
                match &unit.state {
                    LeaseState::Owned { incarnation, .. }
                        if !skip.contains(&unit.name)
                            && (lost_session.is_none()
                                || unit.taken_from.as_deref() != lost_session) =>
                    {
                        Some(RestartTarget {
                            incarnation: incarnation.clone(),
                            runner: unit.runner.clone(),
                        })
                    }
                    _ => None,
                }
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        tracing::info!(
            "cluster: restarting {} unit(s) here with {cause} ({:?})",
            targets.len(),
            self.strategy
        );
        let group = RestartGroup {
            targets,
            cause: cause.clone(),
        };
        if let Some(queue) = &self.restart_queue
            && queue.try_send(group).is_err()
        {
            tracing::warn!(
                "cluster: too many restarts queued here; the one with {cause} is not done"
            );
        }
    }

    /// `agent-host cluster drain`: hand every unit over and take none any
    /// more; answer with the units handed over.
    async fn drain(&mut self, request: async_nats::Message) {
        for unit in &mut self.units {
            unit.eligible = false;
        }
        self.draining = true;
        self.presence_sent = None;
        self.renew_presence().await;
        let owned: Vec<String> = self
            .units
            .iter()
            .filter(|u| matches!(u.state, LeaseState::Owned { .. }))
            .map(|u| u.name.clone())
            .collect();
        for unit in &owned {
            self.release(unit, false).await;
        }
        if let Some(reply) = request.reply
            && let Ok(body) = serde_json::to_vec(&owned)
        {
            let _ = self.client.publish(reply, Bytes::from(body)).await;
        }
    }

    /// Stop unit `name` here and delete its lease (handover). After a
    /// failed start, also keep away from it for a lease time.
    async fn release(&mut self, name: &str, failed: bool) {
        let ttl = self.ttl;
        let Some(unit) = self.units.iter_mut().find(|u| u.name == name) else {
            return;
        };
        let LeaseState::Owned {
            revision,
            incarnation,
            ..
        } = &unit.state
        else {
            return;
        };
        let (revision, incarnation) = (*revision, incarnation.clone());
        unit.gate.set(None);
        let (done, stopped) = oneshot::channel();
        if unit.runner.send(Command::Stop { done }).await.is_ok() {
            let _ = stopped.await;
        }
        let deleted = self
            .leases
            .delete_expect_revision(unit.key.clone(), Some(revision))
            .await;
        unit.state = LeaseState::Other {
            revision,
            seen: Instant::now(),
            host: self.host_id.clone(),
        };
        if failed {
            unit.cool_off_until = Some(Instant::now() + ttl);
        }
        if deleted.is_ok() {
            let _ = self.events.send(ClusterEvent::Released {
                unit: unit.name.clone(),
                incarnation,
            });
        }
    }
}

impl UnitLease {
    /// Take in what the lease shows now.
    fn observe(&mut self, entry: &kv::Entry, now: Instant) {
        self.state = observed(entry, now);
        // A deleted lease was handed over, not lost: no holder to count.
        self.holder = match entry.operation {
            Operation::Put => serde_json::from_slice(&entry.value).ok(),
            Operation::Delete | Operation::Purge => None,
        };
    }

    fn may_try(&self, now: Instant) -> bool {
        self.eligible && self.cool_off_until.is_none_or(|until| now >= until)
    }

    /// Close the gate at once and ask the runner to stop the unit.
    fn fence(&self, events: &broadcast::Sender<ClusterEvent>, incarnation: &str, reason: &str) {
        self.gate.set(None);
        let _ = events.send(ClusterEvent::Fenced {
            unit: self.name.clone(),
            incarnation: incarnation.to_owned(),
            reason: reason.to_owned(),
        });
        let (done, _) = oneshot::channel();
        if self.runner.try_send(Command::Stop { done }).is_err() {
            tracing::warn!(
                "cluster: could not ask {} to stop (its runner is busy); it is fenced",
                self.name
            );
        }
    }
}

/// Add a restart (a takeover or a crash) to the shared history; if it
/// makes the root's restarts exceed its intensity, stop the tree on every
/// host (the key `halt`).
async fn record_restart(
    history: &kv::Store,
    leases: &kv::Store,
    entry: HistoryEntry,
    intensity: RestartIntensity,
) {
    let last = match entry.kind {
        RestartKind::Takeover => format!(
            "unit {} taken over from host {} by {}",
            entry.unit, entry.lost_host, entry.by_host
        ),
        RestartKind::Crash => format!(
            "unit {} exited and was restarted on host {}",
            entry.unit, entry.by_host
        ),
    };
    match history::record(history, entry, &intensity, now_ms()).await {
        Ok(count) if count > intensity.max_restarts as usize => {
            let reason = format!(
                "{count} restarts of its units across the cluster (lost hosts and crashes) within {} ms, more than max_restarts = {} (last: {last})",
                intensity.time_window.as_millis(),
                intensity.max_restarts
            );
            tracing::error!("cluster: the root gives up: {reason}");
            if let Err(e) = leases.put(history::HALT_KEY, Bytes::from(reason)).await {
                tracing::error!("cluster: cannot stop the tree on every host: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cluster: {e}"),
    }
}

/// A unit this host runs, to be restarted with another.
struct RestartTarget {
    incarnation: String,
    runner: mpsc::Sender<Command>,
}

/// The units this host runs that restart with `cause`, in the tree file's
/// order.
struct RestartGroup {
    targets: Vec<RestartTarget>,
    cause: String,
}

/// Restart a group as OTP does: every unit stopped, last first, then every
/// one started, first first. A unit that was stopped or fenced meanwhile
/// (its runner no longer runs that incarnation) is left alone.
async fn restart_group(RestartGroup { targets, cause }: RestartGroup) {
    for target in targets.iter().rev() {
        let (done, stopped) = oneshot::channel();
        let halt = Command::Halt {
            incarnation: target.incarnation.clone(),
            done,
        };
        if target.runner.send(halt).await.is_ok() {
            let _ = stopped.await;
        }
    }
    for target in &targets {
        let (done, started) = oneshot::channel();
        let resume = Command::Resume {
            incarnation: target.incarnation.clone(),
            cause: cause.clone(),
            done,
        };
        if target.runner.send(resume).await.is_ok() {
            let _ = started.await;
        }
    }
}

/// The state a lease entry shows, seen at `now`.
fn observed(entry: &kv::Entry, now: Instant) -> LeaseState {
    match entry.operation {
        Operation::Delete | Operation::Purge => LeaseState::Free {
            revision: entry.revision,
        },
        Operation::Put => LeaseState::Other {
            revision: entry.revision,
            seen: now,
            host: serde_json::from_slice::<LeaseRecord>(&entry.value)
                .map(|r| r.host)
                .unwrap_or_default(),
        },
    }
}

async fn next_message(
    subscriber: &mut Option<async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    match subscriber {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The next event of the local tree (`None` once it is gone). Events
/// missed because this host fell behind are not recorded in the shared
/// history (the local root still counted them).
async fn next_tree_event(
    events: &mut Option<broadcast::Receiver<SupervisorEvent>>,
) -> Option<SupervisorEvent> {
    let Some(events) = events else {
        return std::future::pending().await;
    };
    loop {
        match events.recv().await {
            Ok(event) => return Some(event),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    "cluster: {n} events of the local tree missed; restarts among them are not in the shared history"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Starts and stops one unit on this host, and serves its calls while it
/// runs.
struct Runner {
    unit: String,
    spec: ChildSpec,
    tree: TreeHandle,
    client: async_nats::Client,
    names: ClusterNames,
    host_id: String,
    events: broadcast::Sender<ClusterEvent>,
    notes: mpsc::Sender<RunnerNote>,
}

/// The call server of one incarnation: its future, and the signal that
/// makes it unsubscribe, answer what was already on its way, and end.
struct Serving {
    calls: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    drain: CancellationToken,
}

/// How long a drained call server may take to answer what was on its way.
const DRAIN_BOUND: Duration = Duration::from_secs(2);

impl Runner {
    /// The unit did not start here (`error`): say so, and have the manager
    /// give its lease up.
    async fn start_failed(&self, incarnation: &str, error: &impl std::fmt::Display) {
        let _ = self.events.send(ClusterEvent::StartFailed {
            unit: self.unit.clone(),
            incarnation: incarnation.to_owned(),
            error: error.to_string(),
        });
        let _ = self
            .notes
            .send(RunnerNote::StartFailed {
                unit: self.unit.clone(),
            })
            .await;
    }

    async fn run(self, mut commands: mpsc::Receiver<Command>) {
        let mut serving: Option<Serving> = None;
        let mut incarnation = String::new();
        // Whether `incarnation` runs here (started, not stopped since), and
        // whether its subtree is stopped for a restart by the root's
        // strategy (its calls are told to try again meanwhile).
        let mut live = false;
        let mut halted = false;
        let paused = Arc::new(AtomicBool::new(false));
        let path = format!("{}/{}", self.names.root, self.unit);
        loop {
            let command = tokio::select! {
                command = commands.recv() => command,
                () = async {
                    match serving.as_mut() {
                        Some(s) => s.calls.as_mut().await,
                        None => std::future::pending().await,
                    }
                } => {
                    serving = None;
                    continue;
                }
            };
            match command {
                None => break,
                Some(Command::Start {
                    incarnation: new,
                    revision,
                    gate,
                }) => {
                    incarnation = new;
                    halted = false;
                    paused.store(false, Ordering::SeqCst);
                    // A unit left over from an earlier incarnation here
                    // (it cannot be: stops come first), removed to be sure.
                    let _ = self.tree.terminate(&path).await;
                    let _ = self.tree.delete(&path).await;
                    match self
                        .tree
                        .add_child(&self.names.root, self.spec.clone())
                        .await
                    {
                        Ok(_) => {
                            live = true;
                            match self
                                .serve(&incarnation, revision, gate, paused.clone())
                                .await
                            {
                                Ok(s) => serving = Some(s),
                                Err(e) => tracing::warn!(
                                    "cluster: cannot serve the calls of {}: {e}",
                                    self.unit
                                ),
                            }
                            let _ = self.events.send(ClusterEvent::Started {
                                unit: self.unit.clone(),
                                incarnation: incarnation.clone(),
                            });
                        }
                        Err(e) => self.start_failed(&incarnation, &e).await,
                    }
                }
                Some(Command::Halt {
                    incarnation: of,
                    done,
                }) => {
                    if live && !halted && of == incarnation {
                        paused.store(true, Ordering::SeqCst);
                        halted = true;
                        let _ = self.tree.terminate(&path).await;
                        let _ = self.tree.delete(&path).await;
                    }
                    let _ = done.send(());
                }
                Some(Command::Resume {
                    incarnation: of,
                    cause,
                    done,
                }) => {
                    if live && halted && of == incarnation {
                        halted = false;
                        match self
                            .tree
                            .add_child(&self.names.root, self.spec.clone())
                            .await
                        {
                            Ok(_) => {
                                paused.store(false, Ordering::SeqCst);
                                let _ = self.events.send(ClusterEvent::Restarted {
                                    unit: self.unit.clone(),
                                    incarnation: incarnation.clone(),
                                    cause,
                                });
                            }
                            // As a failed start: the lease is given up.
                            Err(e) => self.start_failed(&incarnation, &e).await,
                        }
                    }
                    let _ = done.send(());
                }
                Some(Command::Stop { done }) => {
                    live = false;
                    halted = false;
                    // The gate is closed: calls in flight and arriving meanwhile
                    // are answered "try again" (not dropped, which would make
                    // their callers wait for their deadline) while the unit
                    // stops; then the subscriptions go.
                    let terminated = {
                        let stop = async {
                            let terminated = self.tree.terminate(&path).await;
                            let _ = self.tree.delete(&path).await;
                            terminated
                        };
                        tokio::pin!(stop);
                        match serving.as_mut() {
                            Some(s) => tokio::select! {
                                terminated = &mut stop => terminated,
                                () = s.calls.as_mut() => {
                                    serving = None;
                                    stop.await
                                }
                            },
                            None => stop.await,
                        }
                    };
                    let was_serving = match serving.take() {
                        Some(mut s) => {
                            // Unsubscribed, and whatever the server sent
                            // before that is answered "try again".
                            s.drain.cancel();
                            let _ = tokio::time::timeout(DRAIN_BOUND, s.calls.as_mut()).await;
                            true
                        }
                        None => false,
                    };
                    if was_serving || terminated.is_ok() {
                        let _ = self.events.send(ClusterEvent::Stopped {
                            unit: self.unit.clone(),
                            incarnation: incarnation.clone(),
                        });
                    }
                    paused.store(false, Ordering::SeqCst);
                    let _ = done.send(());
                }
            }
        }
        drop(serving);
        let _ = self.tree.terminate(&path).await;
        let _ = self.tree.delete(&path).await;
    }

    /// Subscribe to the unit's call subjects; the future that answers them.
    async fn serve(
        &self,
        incarnation: &str,
        revision: u64,
        gate: Arc<UnitGate>,
        paused: Arc<AtomicBool>,
    ) -> Result<Serving, async_nats::SubscribeError> {
        let base = format!("{}.{}", self.names.calls, token(&self.unit));
        let exact = self.client.subscribe(base.clone()).await?;
        let nested = self.client.subscribe(format!("{base}.>")).await?;
        let context = Arc::new(ServeContext {
            tree: self.tree.clone(),
            client: self.client.clone(),
            unit_path: format!("{}/{}", self.names.root, self.unit),
            incarnation: incarnation.to_owned(),
            revision: revision.to_string(),
            host: self.host_id.clone(),
            gate,
            paused,
        });
        let drain = CancellationToken::new();
        Ok(Serving {
            calls: Box::pin(serve_calls(exact, nested, context, drain.clone())),
            drain,
        })
    }
}

/// Answer the calls of two subscriptions, [`CONCURRENT_CALLS_PER_UNIT`] at
/// a time (the others wait in the subscriptions), until both end. On
/// `drain`, both are drained: unsubscribed, with what the server had sent
/// before still delivered (and answered), so no call is silently dropped.
async fn serve_calls(
    mut exact: async_nats::Subscriber,
    mut nested: async_nats::Subscriber,
    context: Arc<ServeContext>,
    drain: CancellationToken,
) {
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    let (mut exact_open, mut nested_open, mut draining) = (true, true, false);
    let answer = |message: async_nats::Message| {
        let context = context.clone();
        async move { context.answer(message).await }
    };
    while exact_open || nested_open || !inflight.is_empty() {
        let room = inflight.len() < CONCURRENT_CALLS_PER_UNIT;
        tokio::select! {
            message = exact.next(), if exact_open && room => match message {
                Some(message) => inflight.push(answer(message)),
                None => exact_open = false,
            },
            message = nested.next(), if nested_open && room => match message {
                Some(message) => inflight.push(answer(message)),
                None => nested_open = false,
            },
            Some(()) = inflight.next(), if !inflight.is_empty() => {}
            () = drain.cancelled(), if !draining => {
                draining = true;
                if exact.drain().await.is_err() {
                    exact_open = false;
                }
                if nested.drain().await.is_err() {
                    nested_open = false;
                }
            }
        }
    }
}

/// What the call server of one incarnation needs.
struct ServeContext {
    tree: TreeHandle,
    client: async_nats::Client,
    unit_path: String,
    incarnation: String,
    revision: String,
    host: String,
    gate: Arc<UnitGate>,
    /// Set while the unit's subtree is stopped for a restart by the root's
    /// strategy: calls are told to try again.
    paused: Arc<AtomicBool>,
}

/// How long a served call may take at most (a caller waits no longer than
/// its own deadline anyway; the agent's deadline bounds each call too).
const MAX_SERVED_CALL: Duration = Duration::from_secs(300);

impl ServeContext {
    /// Tell the caller to try again: this incarnation no longer answers.
    /// Only a hint, carrying nothing from any agent (after a kill, the
    /// caller's own retries on no responders do the same).
    async fn retry(&self, reply_to: async_nats::Subject) {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_HEADER, "not-owner");
        let _ = self
            .client
            .publish_with_headers(reply_to, headers, Bytes::new())
            .await;
    }

    async fn answer(&self, message: async_nats::Message) {
        let Some(reply_to) = message.reply.clone() else {
            return;
        };
        if !self.gate.is_open() || self.paused.load(Ordering::SeqCst) {
            // Fenced (or restarting): no agent sees it; the caller tries
            // again.
            self.retry(reply_to).await;
            return;
        }
        let path = message
            .headers
            .as_ref()
            .and_then(|h| h.get(PATH_HEADER))
            .map(|v| v.as_str().to_owned());
        let status = message
            .headers
            .as_ref()
            .is_some_and(|h| h.get(STATUS_HEADER).is_some());
        let body = match path {
            // `agent-host status` on another host: this unit's nodes.
            _ if status => {
                let below = format!("{}/", self.unit_path);
                let nodes: Vec<crate::NodeStatus> = self
                    .tree
                    .status()
                    .into_iter()
                    .filter(|n| n.path == self.unit_path || n.path.starts_with(&below))
                    .collect();
                match serde_json::to_string(&nodes) {
                    Ok(json) => ReplyBody {
                        ok: Some(json),
                        error: None,
                        category: None,
                    },
                    Err(e) => ReplyBody {
                        ok: None,
                        category: Some(format!("{:?}", ErrorCategory::Serialization)),
                        error: Some(e.to_string()),
                    },
                }
            }
            Some(path)
                if path == self.unit_path
                    || path
                        .strip_prefix(&self.unit_path)
                        .is_some_and(|rest| rest.starts_with('/')) =>
            {
                match std::str::from_utf8(&message.payload) {
                    Ok(text) => {
                        let call = self.tree.call(&path, text.to_owned());
                        match tokio::time::timeout(MAX_SERVED_CALL, call).await {
                            Ok(Ok(reply)) => ReplyBody {
                                ok: Some(reply),
                                error: None,
                                category: None,
                            },
                            Ok(Err(e)) => ReplyBody {
                                ok: None,
                                category: Some(format!("{:?}", e.category())),
                                error: Some(e.to_string()),
                            },
                            Err(_) => ReplyBody {
                                ok: None,
                                category: Some(format!("{:?}", ErrorCategory::Runtime)),
                                error: Some(format!("{path} did not answer in time")),
                            },
                        }
                    }
                    Err(_) => ReplyBody {
                        ok: None,
                        category: Some(format!("{:?}", ErrorCategory::Serialization)),
                        error: Some("the message is not UTF-8".into()),
                    },
                }
            }
            _ => ReplyBody {
                ok: None,
                category: Some(format!("{:?}", ErrorCategory::NotFound)),
                error: Some(format!(
                    "the request names no agent of {} (header {PATH_HEADER})",
                    self.unit_path
                )),
            },
        };
        // Checked again: a reply computed by an incarnation that was fenced
        // meanwhile is dropped (the caller retries, and reaches the next);
        // so is one that a restart by the root's strategy cut short (the
        // caller retries, and reaches the restarted unit).
        if !self.gate.is_open() || self.paused.load(Ordering::SeqCst) {
            self.retry(reply_to).await;
            return;
        }
        let Ok(payload) = serde_json::to_vec(&body) else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(INCARNATION_HEADER, self.incarnation.as_str());
        headers.insert(REVISION_HEADER, self.revision.as_str());
        headers.insert(HOST_HEADER, self.host.as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(reply_to, headers, Bytes::from(payload))
            .await
        {
            tracing::debug!("cluster: cannot send a reply: {e}");
        }
    }
}
