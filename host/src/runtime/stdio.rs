//! Guest stdout and stderr: always captured into the instance's bounded
//! [`OutputRing`] (for crash reports), and, when granted, passed through to
//! the host's without ever blocking the guest's call.
//!
//! wasmtime-wasi's inherited stdio writes to the host's stream inside the
//! guest's call: a stalled reader (a paused terminal, `| less`) would block
//! a runtime worker in write(2). Here a guest's write is handed to a
//! host-wide writer thread through a bounded queue instead; when the queue
//! is full the bytes are dropped and counted. The guest's stream is always
//! ready and never fails.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::crash::OutputRing;

/// Largest write a guest makes at once (the permit of `check-write`).
const MAX_WRITE: usize = 8 << 10;
/// Writes queued for the host's stream; with [`MAX_WRITE`], at most 8 MiB.
const QUEUE: usize = 1024;

/// Where one host stream's guest output goes: a queue to its writer thread.
#[derive(Debug)]
pub(crate) struct Forwarder {
    queue: Option<SyncSender<Bytes>>,
    dropped: AtomicU64,
}

impl Forwarder {
    /// A forwarder writing to `sink` on a thread of its own.
    pub fn spawn(name: &str, mut sink: impl Write + Send + 'static) -> Self {
        let (tx, rx) = sync_channel::<Bytes>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for bytes in rx {
                    // A closed or failing stream loses the output; there is
                    // nobody to tell.
                    let _ = sink.write_all(&bytes).and_then(|()| sink.flush());
                }
            });
        if let Err(e) = &spawned {
            tracing::error!("cannot start the {name} thread: guest output is discarded ({e})");
        }
        Self {
            queue: spawned.ok().map(|_| tx),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queue `bytes` for the host's stream, or drop and count them.
    fn send(&self, bytes: Bytes) {
        let len = bytes.len() as u64;
        let sent = match &self.queue {
            Some(queue) => match queue.try_send(bytes) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            self.dropped.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// Bytes dropped so far because the host's stream did not keep up.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The host's stdout, for guests granted it.
pub(crate) fn host_stdout() -> Arc<Forwarder> {
    static STDOUT: OnceLock<Arc<Forwarder>> = OnceLock::new();
    STDOUT
        .get_or_init(|| Arc::new(Forwarder::spawn("guest-stdout", std::io::stdout())))
        .clone()
}

/// The host's stderr, for guests granted it.
pub(crate) fn host_stderr() -> Arc<Forwarder> {
    static STDERR: OnceLock<Arc<Forwarder>> = OnceLock::new();
    STDERR
        .get_or_init(|| Arc::new(Forwarder::spawn("guest-stderr", std::io::stderr())))
        .clone()
}

/// A guest's stdout or stderr stream, as WASI sees it: kept in its ring,
/// and forwarded to the host's stream if granted.
#[derive(Debug, Clone)]
pub(crate) struct GuestOutput {
    pub ring: OutputRing,
    pub forward: Option<Arc<Forwarder>>,
}

impl GuestOutput {
    fn take(&self, bytes: Bytes) {
        self.ring.push(&bytes);
        if let Some(forward) = &self.forward {
            forward.send(bytes);
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_WRITE)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let len = buf.len().min(MAX_WRITE);
        self.take(Bytes::copy_from_slice(&buf[..len]));
        Poll::Ready(Ok(len))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::Receiver;

    use super::*;

    /// A stream whose reader never reads: its first write blocks until the
    /// test ends.
    struct Stalled(Mutex<Receiver<()>>);

    impl Write for Stalled {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.lock().map(|rx| rx.recv());
            Err(std::io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_host_stream_never_blocks_the_guest_and_the_excess_is_counted() {
        let (release, stalled) = std::sync::mpsc::channel();
        let forwarder = Arc::new(Forwarder::spawn("test", Stalled(Mutex::new(stalled))));
        let ring = OutputRing::new(64);
        let mut output = GuestOutput {
            ring: ring.clone(),
            forward: Some(forwarder.clone()),
        };
        let chunk = Bytes::from(vec![b'x'; MAX_WRITE]);
        // The writer thread takes one write and blocks in it; the queue
        // takes QUEUE more; the rest is dropped, never waited for.
        for _ in 0..QUEUE + 100 {
            assert_eq!(output.check_write().unwrap(), MAX_WRITE);
            output.write(chunk.clone()).unwrap();
            output.flush().unwrap();
        }
        assert!(forwarder.dropped() >= 99 * MAX_WRITE as u64);
        assert_eq!(ring.lines(), [format!("…{}", "x".repeat(64))], "kept too");
        drop(release);
    }
}
