//! Where a task's stdout and stderr go: a sink that keeps the last bytes written and never
//! refuses a write. wasmtime-wasi's `MemoryOutputPipe` keeps the first bytes and then fails every
//! write, which makes Rust's `println!` panic: a chatty task (or a `dbg!` left in) would trap
//! once it had printed 16 KiB. The tail is also the part worth showing: a guest's panic message
//! is the last thing it prints.

use bytes::Bytes;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// How much one write may hand over at a time: any amount is taken, this only sizes the guest's
/// buffer.
const WRITE_PERMIT: usize = 64 << 10;

/// Keeps the last `capacity` bytes written to it; clones share the same buffer.
#[derive(Debug, Clone)]
pub struct OutputTail {
    inner: Arc<Mutex<Tail>>,
}

#[derive(Debug)]
struct Tail {
    capacity: usize,
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl OutputTail {
    /// A sink keeping the last `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        let tail = Tail { capacity, bytes: VecDeque::new(), dropped: 0 };
        OutputTail { inner: Arc::new(Mutex::new(tail)) }
    }

    fn push(&self, data: &[u8]) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let keep = data.len().min(t.capacity);
        t.dropped += (data.len() - keep) as u64;
        t.bytes.extend(&data[data.len() - keep..]);
        let over = t.bytes.len().saturating_sub(t.capacity);
        t.bytes.drain(..over);
        t.dropped += over as u64;
    }

    /// The kept text, saying how much came before it when the head was dropped.
    pub fn contents(&self) -> String {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = t.bytes.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        match t.dropped {
            0 => text,
            n => format!("[{n} earlier bytes not kept]\n{text}"),
        }
    }
}

impl IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for OutputTail {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputTail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for OutputTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::OutputTail;

    #[test]
    fn keeps_the_tail_and_counts_what_it_dropped() {
        let tail = OutputTail::new(8);
        tail.push(b"0123");
        tail.push(b"456789ab");
        assert_eq!(tail.contents(), "[4 earlier bytes not kept]\n456789ab");
        tail.push(b"a long write longer than the capacity: END");
        assert!(tail.contents().ends_with("ity: END"), "{}", tail.contents());
        assert_eq!(OutputTail::new(8).contents(), "");
    }
}
