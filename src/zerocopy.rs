//! Zero-copy responses for blobs kept as local files, and the client
//! connection wrapper that sends them.
//!
//! hyper writes an HTTP/1 response body by handing the connection the
//! body's own buffers (vectored writes, no copy). A file-backed body
//! therefore yields *placeholders*: slices of one static region that nothing
//! ever reads. [`ClientIo`] recognises them by address and sends the
//! matching file bytes with sendfile(2) instead, so blob bytes go from the
//! page cache to the socket without passing through this process.
//!
//! The bytes stay right by construction: placeholders are only made for a
//! connection whose `ClientIo` consumes them, in the order they were made,
//! and a placeholder that does not line up with the next queued file slice
//! aborts the connection instead of being sent.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::telemetry::metrics::metrics;

/// Largest placeholder, and so the most one sendfile call is asked for.
const FRAME: usize = 2 << 20;

/// Never read: only its address range matters.
static PLACEHOLDER: [u8; FRAME] = [0; FRAME];

/// Bytes `start..start + len` of a file.
#[derive(Clone, Debug)]
pub struct FileSlice {
    pub file: Arc<File>,
    pub start: u64,
    pub len: u64,
}

/// Part of a body: bytes, or a slice of a file to send as it is.
pub enum Piece {
    Bytes(Bytes),
    File(FileSlice),
}

/// The file slices a connection still has to send, in body order. A clone
/// travels with each request on the connection (as a request extension), so
/// handlers can answer with [`file_body`] or [`pieces_body`].
#[derive(Clone, Debug, Default)]
pub struct SendQueue(Arc<Mutex<VecDeque<Pending>>>);

#[derive(Debug)]
struct Pending {
    file: Arc<File>,
    offset: u64,
    remaining: usize,
}

impl SendQueue {
    fn push(&self, file: Arc<File>, offset: u64, len: usize) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Pending {
                file,
                offset,
                remaining: len,
            });
    }
}

fn is_placeholder(buf: &[u8]) -> bool {
    let base = PLACEHOLDER.as_ptr() as usize;
    let at = buf.as_ptr() as usize;
    !buf.is_empty() && at >= base && at < base + FRAME
}

/// A body that sends `slice` through `queue`'s connection with sendfile.
pub fn file_body(
    queue: SendQueue,
    slice: FileSlice,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let end = slice.start + slice.len;
    futures::stream::unfold(slice.start, move |pos| {
        let queue = queue.clone();
        let file = slice.file.clone();
        async move {
            if pos >= end {
                return None;
            }
            let n = (end - pos).min(FRAME as u64) as usize;
            // sendfile runs on the async worker: have the kernel read this
            // frame and the next ahead, so it rarely waits on the disk.
            let len = std::num::NonZeroU64::new((end - pos).min(2 * FRAME as u64));
            let _ = rustix::fs::fadvise(&*file, pos, len, rustix::fs::Advice::WillNeed);
            queue.push(file, pos, n);
            Some((Ok(Bytes::from_static(&PLACEHOLDER[..n])), pos + n as u64))
        }
    })
}

/// A body of bytes and file slices, the slices sent through `queue`'s
/// connection with sendfile.
pub fn pieces_body(
    queue: SendQueue,
    pieces: impl futures::Stream<Item = io::Result<Piece>> + Send + 'static,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    use futures::StreamExt;
    pieces.flat_map(move |piece| match piece {
        Ok(Piece::File(slice)) => file_body(queue.clone(), slice).left_stream(),
        Ok(Piece::Bytes(b)) => futures::stream::once(std::future::ready(Ok(b))).right_stream(),
        Err(e) => futures::stream::once(std::future::ready(Err(e))).right_stream(),
    })
}

/// A client's TCP connection as the HTTP server sees it: sends queued file
/// slices with sendfile, drops clients that stop reading, and bounds how
/// long a new connection may take to say anything.
pub struct ClientIo {
    tcp: TcpStream,
    queue: SendQueue,
    /// A write that makes no progress for this long fails.
    send_timeout: Duration,
    send_stall: Option<Pin<Box<Sleep>>>,
    /// Until the first bytes arrive (before any protocol timer runs).
    first_read: Option<Pin<Box<Sleep>>>,
}

impl ClientIo {
    pub fn new(tcp: TcpStream, send_timeout: Duration, first_byte_timeout: Duration) -> Self {
        Self {
            tcp,
            queue: SendQueue::default(),
            send_timeout,
            send_stall: None,
            first_read: Some(Box::pin(tokio::time::sleep(first_byte_timeout))),
        }
    }

    /// Waits for bytes from the client and copies the first into `buf`
    /// without taking them from the stream.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.peek(buf).await
    }

    /// The queue handlers use to send files on this connection.
    pub fn queue(&self) -> SendQueue {
        self.queue.clone()
    }

    fn write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let bufs = &bufs[first..];
        if !is_placeholder(&bufs[0]) {
            // Ordinary bytes (headers, small bodies) up to the next file slice.
            let end = bufs
                .iter()
                .position(|b| is_placeholder(b))
                .unwrap_or(bufs.len());
            return Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..end]);
        }
        let want = bufs[0].len();
        let mut queue = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(next) = queue.front_mut() else {
            return Poll::Ready(Err(out_of_step("no file queued")));
        };
        if next.remaining != want {
            return Poll::Ready(Err(out_of_step("file slice and body disagree")));
        }
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let tcp = &self.tcp;
            let sent = tcp.try_io(Interest::WRITABLE, || {
                let mut offset = next.offset;
                rustix::fs::sendfile(tcp, &*next.file, Some(&mut offset), want)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than its size",
                    )));
                }
                Ok(n) => {
                    metrics().zero_copy_bytes.inc_by(n as u64);
                    next.offset += n as u64;
                    next.remaining -= n;
                    if next.remaining == 0 {
                        queue.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Fails a write that has been pending for `send_timeout`.
    fn bound_stall(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if result.is_ready() {
            self.send_stall = None;
            return result;
        }
        let timeout = self.send_timeout;
        let stall = self
            .send_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn out_of_step(what: &str) -> io::Error {
    tracing::error!(what, "zero-copy send out of step; closing the connection");
    io::Error::other(format!("zero-copy send out of step: {what}"))
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let Some(deadline) = this.first_read.as_mut() {
            if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                this.first_read = None;
            } else if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client sent nothing",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = self.write_slices(cx, &[IoSlice::new(buf)]);
        self.bound_stall(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = self.write_slices(cx, bufs);
        self.bound_stall(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper then queues body buffers instead of copying them into its
        // own, which is what lets placeholders reach `write_slices` intact.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
