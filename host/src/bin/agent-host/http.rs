//! `--http`: the observer's HTTP server for `run` and `demo` (metrics, the
//! JSON API, the live tree view), a thin layer over
//! `terraphim_agent_supervisor::observe::http`.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use terraphim_agent_supervisor::observe::Observer;
use terraphim_agent_supervisor::observe::http::{
    self, ControlToken, HttpConfig, HttpServer, TOKEN_HEADER,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::output::stderr_line;

/// How long the server gets to finish the requests in progress at exit.
const STOP_WITHIN: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Serve Prometheus metrics (/metrics), a JSON API (/api/...) and a live
    /// view of the tree (/) over HTTP on ADDR: PORT (on 127.0.0.1),
    /// IP:PORT or localhost:PORT; without ADDR, a free port on 127.0.0.1.
    /// The address in use is printed.
    #[arg(
        long,
        value_name = "ADDR",
        num_args = 0..=1,
        default_missing_value = "127.0.0.1:0"
    )]
    pub http: Option<String>,
    /// Allow --http to listen on an address that is not loopback (anyone who
    /// reaches it can read the tree's status and metrics).
    #[arg(long, requires = "http")]
    pub http_allow_remote: bool,
    /// Serve the management calls (terminate, restart a node) over HTTP, to
    /// requests that carry the control token printed at start in the
    /// X-Agent-Host-Token header.
    #[arg(long, requires = "http")]
    pub http_allow_control: bool,
}

/// A bound server, not serving yet, and its control token.
pub struct Bound {
    server: HttpServer,
    token: Option<ControlToken>,
}

impl Bound {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The page's URL, with the control token in its fragment (which the
    /// browser does not send to the server) when control is on.
    pub fn url(&self) -> String {
        match &self.token {
            Some(token) => format!("http://{}/#token={}", self.addr(), token.as_str()),
            None => format!("http://{}/", self.addr()),
        }
    }

    /// The control token, if control is on.
    pub fn token(&self) -> Option<&ControlToken> {
        self.token.as_ref()
    }
}

/// Bind the server `args` ask for, if any (before the tree starts, so that
/// a bad address stops the command at once).
pub async fn bind(args: &HttpArgs) -> Result<Option<Bound>, String> {
    let Some(addr) = &args.http else {
        return Ok(None);
    };
    let addr = http::parse_addr(addr).map_err(|e| e.to_string())?;
    let token = args.http_allow_control.then(ControlToken::generate);
    let config = HttpConfig {
        allow_remote: args.http_allow_remote,
        control: token.clone(),
    };
    let server = http::bind(addr, config).await.map_err(|e| e.to_string())?;
    Ok(Some(Bound { server, token }))
}

/// Tell the operator the control token (stderr), if control is on.
pub fn announce_token(bound: &Bound, file: Option<&Path>) {
    if let Some(token) = bound.token() {
        stderr_line!(
            "HTTP control token (send it in the {TOKEN_HEADER} header): {}",
            token.as_str()
        );
        stderr_line!("Tree view with management calls: {}", bound.url());
        if let Some(file) = file {
            stderr_line!("(also in {}, readable by you only)", file.display());
        }
    }
}

/// A serving HTTP server.
pub struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Serve `observer` on `bound` in a task of its own.
pub fn serve(bound: Bound, observer: Observer) -> Serving {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = bound.server.serve(observer, shutdown).await {
            stderr_line!("warning: the HTTP server failed: {e}");
        }
    });
    Serving { stop, task }
}

impl Serving {
    /// Stop serving: the event streams end, the requests in progress get
    /// [`STOP_WITHIN`] to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(STOP_WITHIN, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// The control token in a file only this user may read, removed on drop.
pub struct TokenFile(PathBuf);

impl TokenFile {
    /// Write `token` to `path` (mode 0600, replacing a stale file).
    pub fn write(path: PathBuf, token: &ControlToken) -> Result<Self, String> {
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                format!(
                    "cannot write the HTTP control token to {}: {e}",
                    path.display()
                )
            })?;
        writeln!(file, "{}", token.as_str()).map_err(|e| {
            format!(
                "cannot write the HTTP control token to {}: {e}",
                path.display()
            )
        })?;
        Ok(Self(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
