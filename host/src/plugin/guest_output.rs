//! Where a plugin's standard output and error go: the relay's log, one line
//! at a time, tagged with the plugin's configured name (stdout at `info`,
//! stderr at `warn`). A Rust guest's panic message, a `print` or an
//! uncaught exception's text thus reach the plugin's author.
//!
//! One plugin cannot flood the log: a line is cut at
//! [`MAX_LINE_CHARS`], and past [`MAX_LINES_PER_SECOND`] lines in one second
//! the rest of that second's lines are dropped and counted in one line.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line logged; the rest of a longer line is dropped.
pub const MAX_LINE_CHARS: usize = 2000;
/// Lines one plugin may log per second, stdout and stderr together.
pub const MAX_LINES_PER_SECOND: u32 = 50;
/// Bytes of an unfinished line kept while waiting for its end.
const MAX_PENDING_BYTES: usize = 4 * MAX_LINE_CHARS;

/// Which stream a guest wrote to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A plugin's share of the log, common to its streams and instances.
#[derive(Debug)]
pub struct LogBudget {
    plugin: String,
    /// (the second, lines logged in it, lines dropped in it)
    window: Mutex<(u64, u32, u64)>,
}

impl LogBudget {
    pub fn new(plugin: &str) -> Arc<Self> {
        Arc::new(Self { plugin: plugin.to_owned(), window: Mutex::new((0, 0, 0)) })
    }

    /// Logs `line` unless this second's budget is spent.
    fn log(&self, stream: Stream, line: &str) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        self.log_in_second(now, stream, line);
    }

    /// [`Self::log`] in the clock's second `now` (seconds since the epoch).
    fn log_in_second(&self, now: u64, stream: Stream, line: &str) {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if window.0 != now {
            if window.2 > 0 {
                tracing::warn!(plugin = %self.plugin, dropped = window.2, "plugin output dropped: over {MAX_LINES_PER_SECOND} lines a second");
            }
            *window = (now, 0, 0);
        }
        if window.1 >= MAX_LINES_PER_SECOND {
            window.2 += 1;
            return;
        }
        window.1 += 1;
        drop(window);
        let line: String = line.chars().take(MAX_LINE_CHARS).collect();
        match stream {
            Stream::Stdout => tracing::info!(plugin = %self.plugin, stream = "stdout", "{line}"),
            Stream::Stderr => tracing::warn!(plugin = %self.plugin, stream = "stderr", "{line}"),
        }
    }
}

/// A guest stream that writes to the log (see the module docs). One per
/// stream per instance: a line written in pieces, through several stream
/// handles and flushes (as CPython writes a traceback), is logged whole.
#[derive(Clone)]
pub struct GuestOutput {
    line: Arc<Mutex<LineBuffer>>,
}

impl GuestOutput {
    pub fn new(budget: Arc<LogBudget>, stream: Stream) -> Self {
        Self { line: Arc::new(Mutex::new(LineBuffer { budget, stream, pending: Vec::new(), overlong: false })) }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter { line: self.line.clone() })
    }
}

/// Cuts what a guest writes into lines and logs each. An unfinished line
/// waits for its end, or is logged when the instance goes away.
struct LineBuffer {
    budget: Arc<LogBudget>,
    stream: Stream,
    pending: Vec<u8>,
    /// The current line was already logged, cut; the rest is dropped.
    overlong: bool,
}

impl LineBuffer {
    fn write(&mut self, buf: &[u8]) {
        for chunk in buf.split_inclusive(|b| *b == b'\n') {
            if !self.overlong {
                self.pending.extend_from_slice(chunk);
            }
            if chunk.ends_with(b"\n") {
                self.emit();
                self.overlong = false;
            } else if self.pending.len() > MAX_PENDING_BYTES {
                // Log the start of a line that never ends; drop the rest.
                self.emit();
                self.overlong = true;
            }
        }
    }

    fn emit(&mut self) {
        if !self.overlong {
            let text = String::from_utf8_lossy(&self.pending);
            let line = text.trim_end_matches(['\r', '\n']);
            if !line.is_empty() {
                self.budget.log(self.stream, line);
            }
        }
        self.pending.clear();
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.emit();
        }
    }
}

/// One stream handle the guest holds.
struct LineWriter {
    line: Arc<Mutex<LineBuffer>>,
}

impl AsyncWrite for LineWriter {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.line.lock().unwrap_or_else(|p| p.into_inner()).write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    /// A flush does not end a line: CPython flushes between the parts of one.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line written in pieces, each through a new stream handle with a
    /// flush after it, is one line; the unfinished tail is logged when the
    /// instance's output goes away.
    #[tokio::test]
    async fn a_line_written_in_pieces_is_logged_whole() {
        use tokio::io::AsyncWriteExt;
        let output = GuestOutput::new(LogBudget::new("pieces"), Stream::Stderr);
        for piece in ["ValueError", ": ", "bad value\nnext"] {
            let mut handle = Pin::from(output.async_stream());
            handle.write_all(piece.as_bytes()).await.unwrap();
            handle.flush().await.unwrap();
        }
        let buffer = output.line.lock().unwrap();
        assert_eq!(buffer.budget.window.lock().unwrap().1, 1, "one line logged so far");
        assert_eq!(buffer.pending, b"next", "the unfinished line waits");
    }

    /// The budget is per second of the clock: a flood that straddles a
    /// second's end logs up to the budget in each second it touches, and
    /// what was dropped in a second is counted when the next one starts.
    #[test]
    fn a_flood_logs_at_most_the_budget_in_each_second() {
        let budget = LogBudget::new("flood");
        for (second, lines) in [(100, 80), (101, 400), (103, 10)] {
            for _ in 0..lines {
                budget.log_in_second(second, Stream::Stdout, "flood line");
            }
            let (at, logged, dropped) = *budget.window.lock().unwrap();
            assert_eq!(at, second);
            assert_eq!(logged, lines.min(MAX_LINES_PER_SECOND), "logged in second {second}");
            assert_eq!(dropped, u64::from(lines.saturating_sub(MAX_LINES_PER_SECOND)), "dropped in second {second}");
        }
    }
}
