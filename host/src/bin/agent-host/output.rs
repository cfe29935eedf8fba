//! Output to stdout and stderr that never blocks the caller and never
//! panics, even while the reader stalls (a paused terminal, `| less`, a log
//! shipper) or has gone away (`agent-host demo --json | head`).
//!
//! Every line written while a tree may run in this process (an
//! [`Out::new`] line, a [`stderr_line!`] message, a log record) goes into a
//! bounded queue that a writer thread of its own empties into the stream:
//! tracing-appender's non-blocking writer, in lossy mode. The caller only
//! ever enqueues, so no tokio worker (and no guest call, which logs through
//! the host's `log` import) ever waits in write(2). When the queue is full
//! the line is dropped and counted; [`finish`] reports the count at exit.
//! When the stream is closed, its writer thread records that
//! ([`Out::is_broken`]) and drops the rest: no write error reaches a
//! caller, and none reaches a fallback `eprintln!` that would panic.
//! ([`Out::blocking`] is for the client commands, which run no tree.)
//!
//! Invariants:
//! - a line is one queue message, written with one `write_all`: lines stay
//!   whole, and lines from one task keep their order (one FIFO queue, one
//!   writer thread per stream);
//! - `sent = dropped + queued + written`, where `written` counts lines the
//!   writer thread is done with (written, or skipped because the stream is
//!   broken), so "queue empty" is `sent - dropped == written`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines queued for stdout before further lines are dropped. An event line
/// is about 100 bytes, so this holds about half a MiB.
const STDOUT_QUEUE_LINES: usize = 4096;
/// Log records queued for stderr before further records are dropped. A
/// guest's record is cut at 4 KiB, so this holds at most about 9 MiB.
const STDERR_QUEUE_LINES: usize = 2048;

/// At exit, give up waiting for a stream's queue to empty once its writer
/// thread has written nothing for this long (the reader stalls)...
const EXIT_STALL: Duration = Duration::from_secs(1);
/// ...or once this much time has passed in all (the reader is alive but
/// slower than the backlog needs). `run` and `demo` catch Ctrl-C and
/// SIGTERM for good (tokio's handlers stay installed), so these two bound
/// how long those take to end the process.
const EXIT_WAIT_MAX: Duration = Duration::from_secs(10);

/// What the writer thread of a stream reports to the callers.
#[derive(Default)]
struct Progress {
    /// Lines the writer thread is done with (see the module's invariants).
    written: AtomicUsize,
    /// The stream failed (closed, or broken): later lines are skipped.
    broken: AtomicBool,
}

/// The writer thread's end of a queue: writes each line whole, and turns
/// every error into [`Progress::broken`] instead of returning it.
///
/// tracing-appender's worker (0.2.5, `worker.rs`) ignores errors from
/// `write_all` but prints a failed final `flush` with `eprintln!`, which
/// panics when stderr is closed; this writer never fails, so that path is
/// never taken.
struct Tracked<W> {
    inner: W,
    progress: Arc<Progress>,
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    /// The worker calls this once per queued line.
    fn write_all(&mut self, line: &[u8]) -> io::Result<()> {
        if !self.progress.broken.load(Ordering::Relaxed)
            && self
                .inner
                .write_all(line)
                .and_then(|()| self.inner.flush())
                .is_err()
        {
            self.progress.broken.store(true, Ordering::Relaxed);
        }
        self.progress.written.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Every line was flushed by [`write_all`](Self::write_all).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The callers' end of a queue to one stream.
struct Sink {
    queue: NonBlocking,
    dropped: ErrorCounter,
    /// Lines handed to [`send`](Self::send), dropped or not.
    sent: AtomicUsize,
    progress: Arc<Progress>,
    /// Kept until [`finish`]: dropping it shuts the writer thread down.
    guard: Mutex<Option<WorkerGuard>>,
}

impl Sink {
    fn new(writer: impl Write + Send + 'static, lines: usize, thread: &str) -> Self {
        let progress = Arc::new(Progress::default());
        let (queue, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(lines)
            .thread_name(thread)
            .finish(Tracked {
                inner: writer,
                progress: progress.clone(),
            });
        Self {
            dropped: queue.error_counter(),
            queue,
            sent: AtomicUsize::new(0),
            progress,
            guard: Mutex::new(Some(guard)),
        }
    }

    /// Queue `line` (ending in a newline) as one message; never blocks.
    fn send(&self, line: &[u8]) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        // Lossy mode: a full queue drops the line and counts it, and the
        // write itself always succeeds.
        let _ = self.queue.clone().write_all(line);
    }

    fn is_broken(&self) -> bool {
        self.progress.broken.load(Ordering::Relaxed)
    }

    fn dropped(&self) -> usize {
        self.dropped.dropped_lines()
    }

    /// Lines queued and not yet written.
    fn backlog(&self) -> usize {
        let dropped = self.dropped();
        let written = self.progress.written.load(Ordering::Acquire);
        self.sent
            .load(Ordering::Relaxed)
            .saturating_sub(dropped)
            .saturating_sub(written)
    }

    /// Wait until the queue is empty (true), or until nothing was written
    /// for `stall` or `max` passed (false).
    fn drain(&self, stall: Duration, max: Duration) -> bool {
        let start = Instant::now();
        let mut written = self.progress.written.load(Ordering::Acquire);
        let mut progressed = start;
        loop {
            if self.backlog() == 0 {
                return true;
            }
            let now = self.progress.written.load(Ordering::Acquire);
            if now != written {
                written = now;
                progressed = Instant::now();
            } else if progressed.elapsed() >= stall {
                return false;
            }
            if start.elapsed() >= max {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// End the writer thread: cleanly if the queue is empty, else leave it
    /// to the process exit.
    fn close(&self, drained: bool) {
        let guard = match self.guard.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(guard) = guard else { return };
        if drained {
            // tracing-appender 0.2.5 (`non_blocking.rs`, `Drop for
            // WorkerGuard`): queues a shutdown message (waiting at most
            // 100 ms for room), then waits at most 1 s for the writer thread
            // to take it. With an empty queue both happen at once.
            drop(guard);
        } else {
            // The writer thread is stuck in write(2) with lines queued. The
            // guard's drop would wait 100 ms for room in the full queue and
            // then report the failure with `println!`: that blocks forever
            // on a stalled stdout and panics on a closed one. Skip it; the
            // process exits next, which ends the writer thread.
            std::mem::forget(guard);
        }
    }
}

static STDOUT: OnceLock<Sink> = OnceLock::new();
static STDERR: OnceLock<Sink> = OnceLock::new();

fn stdout() -> &'static Sink {
    STDOUT.get_or_init(|| Sink::new(io::stdout(), STDOUT_QUEUE_LINES, "agent-host-stdout"))
}

fn stderr() -> &'static Sink {
    STDERR.get_or_init(|| Sink::new(io::stderr(), STDERR_QUEUE_LINES, "agent-host-stderr"))
}

/// A writer for the tracing subscriber: each record into the stderr queue.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        stderr().send(buf);
        Ok(buf.len())
    }

    /// The subscriber formats a record whole, then writes it with one call:
    /// one record, one message.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        stderr().send(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write `text` and a newline to stderr, after the log records queued
/// before it; never blocks (see [`stderr_line!`]).
pub fn to_stderr(text: &str) {
    stderr().send(with_newline(text).as_bytes());
}

/// `eprintln!` that never blocks and never panics: the line is queued
/// behind the log records (lossy, like them).
macro_rules! stderr_line {
    ($($arg:tt)*) => {
        $crate::output::to_stderr(&format!($($arg)*))
    };
}
pub(crate) use stderr_line;

fn with_newline(text: &str) -> String {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    line
}

/// At exit (after the async runtime stopped): wait, within bounds, for
/// stdout and then stderr to be written; report lines that were dropped or
/// could not be written; end the writer threads.
pub fn finish() {
    if let Some(out) = STDOUT.get() {
        let drained = out.drain(EXIT_STALL, EXIT_WAIT_MAX);
        // A closed stdout is the reader's choice (`| head`): not reported.
        let lost = if out.is_broken() {
            0
        } else {
            out.dropped() + out.backlog()
        };
        if lost > 0 {
            to_stderr(&format!(
                "warning: {lost} output {} dropped: stdout was not read fast enough",
                plural(lost, "line was", "lines were")
            ));
        }
        out.close(drained);
    }
    let err = stderr();
    // Empty the queue first, so that the report below is not dropped.
    let mut drained = err.drain(EXIT_STALL, EXIT_WAIT_MAX);
    let dropped = err.dropped();
    if drained && dropped > 0 && !err.is_broken() {
        to_stderr(&format!(
            "warning: {dropped} log {} dropped: stderr was not read fast enough",
            plural(dropped, "line was", "lines were")
        ));
        drained = err.drain(EXIT_STALL, EXIT_WAIT_MAX);
    }
    err.close(drained);
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// Line-oriented output to stdout (text or JSON lines).
pub struct Out {
    start: OnceLock<Instant>,
    json: bool,
    /// `None`: through the non-blocking stdout queue ([`Out::new`]);
    /// `Some(broken)`: written at once ([`Out::blocking`]), `broken` once a
    /// write failed.
    direct: Option<AtomicBool>,
}

impl Out {
    /// Output while a tree runs in this process (`run`, `demo`): lines go
    /// through the non-blocking stdout queue, so a stalled reader never
    /// holds up a tokio worker; lines it cannot take in time are dropped
    /// and counted (reported by [`finish`]).
    pub fn new(json: bool) -> Self {
        Self {
            start: OnceLock::new(),
            json,
            direct: None,
        }
    }

    /// Output while no tree runs in this process (`call`, `status`): lines
    /// are written at once and wait for the reader, so none is dropped
    /// (`status` of a large tree into a slow pipe). Nothing else waits for
    /// them, and Ctrl-C still ends the process.
    pub fn blocking(json: bool) -> Self {
        Self {
            start: OnceLock::new(),
            json,
            direct: Some(AtomicBool::new(false)),
        }
    }

    /// Whether lines are JSON objects rather than text.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Start the clock of [`elapsed`](Self::elapsed) now, unless it runs already.
    pub fn start_clock(&self) {
        self.start.get_or_init(Instant::now);
    }

    /// Time since the clock started (it starts at the first use).
    pub fn elapsed(&self) -> Duration {
        self.start.get_or_init(Instant::now).elapsed()
    }

    /// Whether stdout was closed (the reader went away). Through the queue,
    /// the writer thread notices it: true shortly after the failed write.
    pub fn is_broken(&self) -> bool {
        match &self.direct {
            None => stdout().is_broken(),
            Some(broken) => broken.load(Ordering::Relaxed),
        }
    }

    /// Write one line, whole (see the module's invariants). Through the
    /// queue it never blocks; once stdout is closed, lines are dropped.
    pub fn line(&self, text: &str) {
        match &self.direct {
            None => {
                let out = stdout();
                if !out.is_broken() {
                    out.send(with_newline(text).as_bytes());
                }
            }
            Some(broken) => {
                if broken.load(Ordering::Relaxed) {
                    return;
                }
                let mut stdout = io::stdout().lock();
                if stdout
                    .write_all(with_newline(text).as_bytes())
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    broken.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Write `value` as one JSON line.
    pub fn json_line(&self, value: &impl Serialize) {
        match serde_json::to_string(value) {
            Ok(text) => self.line(&text),
            Err(e) => tracing::warn!("cannot serialise an output line: {e}"),
        }
    }
}

/// Seconds with millisecond precision, for JSON.
pub fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// `[  1.203s]`
pub fn stamp(d: Duration) -> String {
    format!("[{:>7.3}s]", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::Sink;

    /// Writes nothing until its gate opens (the sender is dropped), then
    /// keeps every line.
    struct Gated {
        gate: mpsc::Receiver<()>,
        lines: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.gate.recv();
            self.lines
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_and_keeps_lines_whole_and_in_order() {
        let (open, gate) = mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink::new(
            Gated {
                gate,
                lines: lines.clone(),
            },
            4,
            "test-stalled",
        );
        for n in 0..20 {
            sink.send(format!("line {n}\n").as_bytes());
        }
        // At most 4 queued and 1 in the writer's hands: the rest dropped.
        assert!(sink.dropped() >= 15, "dropped {}", sink.dropped());
        assert!(
            !sink.drain(Duration::from_millis(50), Duration::from_secs(10)),
            "a stalled writer is given up on"
        );

        drop(open);
        assert!(sink.drain(Duration::from_secs(10), Duration::from_secs(10)));
        let written = String::from_utf8(lines.lock().expect("lines").clone()).expect("UTF-8");
        let numbers: Vec<usize> = written
            .lines()
            .map(|l| {
                l.strip_prefix("line ")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("not a whole line: {l:?}"))
            })
            .collect();
        assert_eq!(numbers.len() + sink.dropped(), 20, "{written}");
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        assert!(!sink.is_broken());
        sink.close(true);
    }

    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_closed_stream_is_broken_and_no_error_reaches_anyone() {
        let sink = Sink::new(Closed, 16, "test-closed");
        sink.send(b"first\n");
        assert!(sink.drain(Duration::from_secs(10), Duration::from_secs(10)));
        assert!(sink.is_broken());
        for _ in 0..10 {
            sink.send(b"more\n");
        }
        assert!(sink.drain(Duration::from_secs(10), Duration::from_secs(10)));
        sink.close(true);
    }
}
