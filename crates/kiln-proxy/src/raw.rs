//! The fast path to backends: HTTP/1.1 requests without a body, written
//! and their responses read by the client connection's own task, without
//! hyper's client.
//!
//! Why: hyper's client runs each backend connection in a task of its own
//! and hands requests, responses and body chunks to it over channels, so a
//! proxied request woke three tasks and crossed four channels; for small
//! bodies that was a third of the proxy's user-space CPU. Here the request
//! head is encoded into the connection's buffer and written with one
//! `write`, the response head is parsed from the read buffer, and the body
//! is read by the response body itself as hyper's server polls it, in the
//! same task: a small response usually arrives with its head and is
//! forwarded with no further read.
//!
//! Only requests that may be sent twice take this path (idempotent method,
//! empty body): whether the backend saw a request is unknowable once it was
//! written, and a pooled connection the backend just closed is then simply
//! retried on a fresh one. Everything else (bodies, POST, upgrades) goes
//! through hyper's client, which knows whether a request left.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance::ClientCell;

/// Largest response head accepted from a backend.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a response head.
const MAX_HEADERS: usize = 128;
/// Read buffer: what a read may fill at least; body reads of a known length
/// ask for up to `MAX_READ`.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

/// One HTTP/1.1 connection to a backend, idle or serving one request.
#[derive(Debug)]
pub(crate) struct RawConn {
    stream: TcpStream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request head being written (reused).
    out: Vec<u8>,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum RawError {
    /// The backend closed or reset the connection before any byte of the
    /// response.
    Closed(Option<io::Error>),
    /// Reading or writing failed after part of the response arrived.
    Io(io::Error),
    /// The response head is not valid HTTP/1.x.
    BadHead(&'static str),
}

impl RawError {
    pub(crate) fn closed_before_response(&self) -> bool {
        matches!(self, RawError::Closed(_))
    }
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Closed(None) => write!(f, "connection closed before the response"),
            RawError::Closed(Some(e)) => write!(f, "connection lost before the response: {e}"),
            RawError::Io(e) => write!(f, "reading the response: {e}"),
            RawError::BadHead(why) => write!(f, "invalid response head: {why}"),
        }
    }
}

fn closed(e: io::Error) -> RawError {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
            RawError::Closed(Some(e))
        }
        _ => RawError::Io(e),
    }
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection (never reused).
    Close,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

impl RawConn {
    pub(crate) fn new(stream: TcpStream) -> RawConn {
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: BytesMut::new(),
            out: Vec::new(),
        }
    }

    /// Whether an idle connection still looks usable: nothing arrived on it
    /// (a close, or bytes nobody asked for, make it unusable). No syscall
    /// unless the reactor saw it become readable.
    pub(crate) fn looks_alive(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Writes the request head (no body) and reads the response head.
    pub(crate) async fn exchange(
        &mut self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        host: Option<&HeaderValue>,
    ) -> Result<Head, RawError> {
        self.out.clear();
        let out = &mut self.out;
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if let Some(host) = host {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&self.out).await.map_err(closed)?;

        loop {
            if let Some(head) = self.parse_head(method == Method::HEAD)? {
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(RawError::BadHead("larger than 64 KiB"));
            }
            self.buf.reserve(MIN_READ);
            let before = self.buf.len();
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) if before == 0 => return Err(RawError::Closed(None)),
                Ok(0) => {
                    return Err(RawError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(_) => {}
                Err(e) if before == 0 => return Err(closed(e)),
                Err(e) => return Err(RawError::Io(e)),
            }
        }
    }

    /// A complete response head from the buffer (interim 1xx answers are
    /// skipped), or `None` if more bytes are needed.
    fn parse_head(&mut self, head_request: bool) -> Result<Option<Head>, RawError> {
        loop {
            let Some((len, lines)) = head_len(&self.buf) else {
                return Ok(None);
            };
            let bytes = self.buf.split_to(len).freeze();
            let head = parse(&bytes, lines, head_request)?;
            if head.status.is_informational() {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(RawError::BadHead("101 to a request that asked no upgrade"));
                }
                continue;
            }
            return Ok(Some(head));
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(want.clamp(MIN_READ, MAX_READ));
        let read = self.stream.read_buf(&mut self.buf);
        tokio::pin!(read);
        read.poll(cx)
    }
}

/// Length of the head (through the empty line) and its number of lines,
/// if complete.
fn head_len(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    let mut lines = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
        let end = from + i + 1;
        lines += 1;
        if i == 0 || (i == 1 && buf[from] == b'\r') {
            return Some((end, lines));
        }
        from = end;
    }
    None
}

fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse(bytes: &Bytes, line_count: usize, head_request: bool) -> Result<Head, RawError> {
    let mut lines = bytes.split_inclusive(|&b| b == b'\n').map(trim_line);
    let status_line = lines.next().ok_or(RawError::BadHead("empty"))?;
    // HTTP/1.x SSS reason
    let version = match status_line.get(..9) {
        Some(b"HTTP/1.1 ") => Version::HTTP_11,
        Some(b"HTTP/1.0 ") => Version::HTTP_10,
        _ => return Err(RawError::BadHead("not an HTTP/1.x status line")),
    };
    let status = status_line
        .get(9..12)
        .and_then(|code| StatusCode::from_bytes(code).ok())
        .filter(|_| status_line.get(12).is_none_or(|&b| b == b' '))
        .ok_or(RawError::BadHead("bad status code"))?;

    // Sized once: growing a map rehashes it.
    let mut headers = HeaderMap::with_capacity(line_count.min(MAX_HEADERS));
    let mut count = 0;
    for line in lines {
        if line.is_empty() {
            break;
        }
        count += 1;
        if count > MAX_HEADERS {
            return Err(RawError::BadHead("too many headers"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(RawError::BadHead("header line without a colon"))?;
        let name = HeaderName::from_bytes(&line[..colon])
            .map_err(|_| RawError::BadHead("bad header name"))?;
        let value = line[colon + 1..].trim_ascii();
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(value))
            .map_err(|_| RawError::BadHead("bad header value"))?;
        headers.append(name, value);
    }

    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                keep_alive = true;
            }
        }
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if let Some(chunked) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(|te| {
            let last = te.as_bytes().rsplit(|&b| b == b',').next().unwrap_or(b"");
            last.trim_ascii().eq_ignore_ascii_case(b"chunked")
        })
    {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), which
        // must not reach the client; such a connection is not reused.
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        let mut length = None;
        for v in headers.get_all(header::CONTENT_LENGTH) {
            let n = std::str::from_utf8(v.as_bytes())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(RawError::BadHead("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(RawError::BadHead("conflicting content-lengths"));
            }
            length = Some(n);
        }
        Framing::Length(length.unwrap_or(0))
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Head {
        status,
        headers,
        framing,
        keep_alive,
    })
}

/// A backend's response body, read by whoever polls it (hyper's server, in
/// the client connection's task). At its end the connection goes back to
/// its pool if it can carry another request.
#[derive(Debug)]
pub(crate) struct RawBody {
    conn: Option<RawConn>,
    framing: Framing,
    keep_alive: bool,
    cell: Arc<ClientCell>,
}

impl RawBody {
    /// The body of `head`, read from `conn`.
    pub(crate) fn new(conn: RawConn, head: &Head, cell: Arc<ClientCell>) -> RawBody {
        let mut body = RawBody {
            conn: Some(conn),
            framing: head.framing,
            keep_alive: head.keep_alive,
            cell,
        };
        if body.framing == Framing::Length(0) {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.cell.checkin_raw(conn);
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    pub(crate) fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    if conn.buf.is_empty() {
                        let want = usize::try_from(remaining).unwrap_or(MAX_READ);
                        if ready!(conn.poll_fill(cx, want))? == 0 {
                            return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                        }
                    }
                    let take = conn
                        .buf
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let data = conn.buf.split_to(take).freeze();
                    let left = remaining - take as u64;
                    this.framing = Framing::Length(left);
                    if left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx, MAX_READ))? == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match chunked_step(conn, state) {
                    Step::Need => {
                        if ready!(conn.poll_fill(cx, MIN_READ))? == 0 {
                            return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                        }
                    }
                    Step::Next(next) => this.framing = Framing::Chunked(next),
                    Step::Data(data, next) => {
                        this.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Step::End => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Step::Invalid(why) => {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            why,
                        ))));
                    }
                },
            }
        }
    }
}

enum Step {
    Need,
    Next(Chunk),
    Data(Bytes, Chunk),
    End,
    Invalid(&'static str),
}

/// One step of chunked decoding over what is buffered.
fn chunked_step(conn: &mut RawConn, state: Chunk) -> Step {
    let buf = &mut conn.buf;
    let line_end = |buf: &BytesMut| buf.iter().position(|&b| b == b'\n');
    match state {
        Chunk::Size => {
            let Some(end) = line_end(buf) else {
                return if buf.len() > 4096 {
                    Step::Invalid("chunk size line too long")
                } else {
                    Step::Need
                };
            };
            let line = trim_line(&buf[..=end]);
            let digits = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            let size = std::str::from_utf8(digits)
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 16)
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            buf.advance(end + 1);
            match size {
                None => Step::Invalid("bad chunk size"),
                Some(0) => Step::Next(Chunk::Trailer),
                Some(n) => Step::Next(Chunk::Data(n)),
            }
        }
        Chunk::Data(remaining) => {
            if buf.is_empty() {
                return Step::Need;
            }
            let take = buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let data = buf.split_to(take).freeze();
            let left = remaining - take as u64;
            let next = if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            };
            Step::Data(data, next)
        }
        Chunk::DataEnd => {
            let Some(end) = line_end(buf) else {
                return Step::Need;
            };
            let empty = trim_line(&buf[..=end]).is_empty();
            buf.advance(end + 1);
            if empty {
                Step::Next(Chunk::Size)
            } else {
                Step::Invalid("chunk data longer than its size")
            }
        }
        Chunk::Trailer => {
            let Some(end) = line_end(buf) else {
                return if buf.len() > MAX_HEAD {
                    Step::Invalid("trailers too large")
                } else {
                    Step::Need
                };
            };
            let empty = trim_line(&buf[..=end]).is_empty();
            buf.advance(end + 1);
            // Trailers are dropped (not forwarded).
            if empty {
                Step::End
            } else {
                Step::Next(Chunk::Trailer)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads_and_framing() {
        let b = Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  b \r\nx-a: c\r\n\r\n",
        );
        let h = parse(&b, 9, false).unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        let a: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["b", "c"]);

        let b = Bytes::from_static(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(
            parse(&b, 9, false).unwrap().framing,
            Framing::Chunked(Chunk::Size)
        );
        let b = Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let h = parse(&b, 9, false).unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.keep_alive && !h.headers.contains_key("content-length"));
        let b = Bytes::from_static(b"HTTP/1.0 200 OK\r\n\r\n");
        let h = parse(&b, 9, false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let b = Bytes::from_static(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n");
        assert_eq!(parse(&b, 9, false).unwrap().framing, Framing::Length(0));
        let b = Bytes::from_static(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n");
        assert_eq!(parse(&b, 9, true).unwrap().framing, Framing::Length(0));
        let b = Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        );
        assert!(!parse(&b, 9, false).unwrap().keep_alive);
    }

    #[test]
    fn rejects_bad_heads() {
        for head in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
        ] {
            assert!(
                parse(&Bytes::from_static(head), 9, false).is_err(),
                "{head:?}"
            );
        }
    }

    #[test]
    fn head_len_finds_the_empty_line() {
        assert_eq!(
            head_len(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"),
            Some((25, 3))
        );
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\nA: b\r\n"), None);
    }
}
