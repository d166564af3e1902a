//! The load generator: std only, raw HTTP/1.1 over `TcpStream`.
//!
//! Each client is a thread that sends `GET path` in a loop until stopped,
//! either over one keep-alive connection it reuses, or over a new
//! connection per request (`Connection: close`). Every answer is checked by
//! the caller's [`Check`]; every request that did not get a complete, good
//! answer is a [`Failure`] of one [`FailureKind`].
//!
//! # What counts as a failure
//!
//! A request counts from the moment its first byte is written. From then
//! on, anything but a complete `200` response that the check accepts is a
//! failure: a reset, a clean EOF, a short read, a timeout, another status, a
//! malformed response or a wrong body. Before that:
//!
//! - a refused or timed-out connect is a failure ([`FailureKind::Connect`]);
//! - a keep-alive connection that the server closed cleanly while it was
//!   idle (a clean EOF seen *before* the next request is written) is not a
//!   failure: HTTP/1.1 lets a server close an idle connection, and the
//!   client reconnects and sends the request on the new connection. These
//!   are counted ([`Report::clean_closes`]) and printed;
//! - a keep-alive connection found reset (not cleanly closed) while idle,
//!   or holding bytes nobody asked for, is a failure
//!   ([`FailureKind::IdleReset`], [`FailureKind::Unsolicited`]): a server
//!   that drops a connection abruptly would lose the request of a client
//!   that wrote it a moment earlier;
//! - a response that says `Connection: close` ends the connection after it
//!   (the next request opens a new one): not a failure.
//!
//! Nothing is retried after a byte of the request was written.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a complete answer may take (the slowest request takes 2 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch (the clock kiln's events use).
pub fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_millis(),
    )
    .expect("milliseconds fit in u64")
}

/// How a client uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One connection, reused for every request while the server keeps it.
    KeepAlive,
    /// A new connection per request, with `Connection: close`.
    Fresh,
}

/// One load-generating thread.
#[derive(Clone, Debug)]
pub struct Client {
    pub name: String,
    pub mode: Mode,
    pub path: String,
    /// Pause between two requests (keeps a 2-core machine responsive).
    pub pause: Duration,
}

/// A complete HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Who answered: the backend's name and the greeting it answered with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answerer {
    pub backend: String,
    pub greeting: String,
}

/// Accepts a `200` response (naming who answered) or says what is wrong.
pub type Check = Arc<dyn Fn(&Response) -> Result<Answerer, String> + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// The TCP connect failed (refused, reset or timed out).
    Connect,
    /// A kept-alive connection was found reset while idle.
    IdleReset,
    /// A kept-alive connection held bytes before a request was sent.
    Unsolicited,
    /// Writing the request failed.
    Write,
    /// The connection was reset after the request was sent.
    Reset,
    /// The connection was closed (clean EOF) after the request was sent,
    /// before any byte of the response.
    Eof,
    /// The connection ended in the middle of the response.
    ShortRead,
    /// No complete response within [`ANSWER_TIMEOUT`].
    Timeout,
    /// The response could not be parsed.
    Malformed,
    /// A status other than 200.
    Status(u16),
    /// A 200 whose body or backend the check refused.
    WrongAnswer,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Connect => f.write_str("connect error"),
            FailureKind::IdleReset => f.write_str("idle keep-alive connection reset"),
            FailureKind::Unsolicited => f.write_str("unsolicited bytes on an idle connection"),
            FailureKind::Write => f.write_str("request write error"),
            FailureKind::Reset => f.write_str("reset after the request was sent"),
            FailureKind::Eof => f.write_str("EOF after the request was sent"),
            FailureKind::ShortRead => f.write_str("short read (response cut)"),
            FailureKind::Timeout => f.write_str("timeout"),
            FailureKind::Malformed => f.write_str("malformed response"),
            FailureKind::Status(code) => write!(f, "status {code}"),
            FailureKind::WrongAnswer => f.write_str("wrong answer"),
        }
    }
}

/// One failed request.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub client: String,
    /// The phase (see [`Load::set_phase`]) when the request was sent.
    pub phase: usize,
    pub sent_ms: u64,
    pub at_ms: u64,
    pub detail: String,
}

/// One answered request to a slow path, kept whole (they are few).
#[derive(Clone, Debug)]
pub struct SlowAnswer {
    pub backend: String,
    pub sent_ms: u64,
    pub done_ms: u64,
}

/// What one backend answered.
#[derive(Clone, Debug, Default)]
pub struct BackendAnswers {
    pub greetings: Vec<String>,
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Everything the clients saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Requests sent (a byte was written) or attempted (connect failed).
    pub requests: u64,
    pub ok: u64,
    pub failures: Vec<Failure>,
    /// Idle keep-alive connections the server closed cleanly, after which
    /// the client reconnected (not failures).
    pub clean_closes: u64,
    /// Responses that said `Connection: close` on a keep-alive client.
    pub close_responses: u64,
    /// Answers per phase.
    pub ok_by_phase: BTreeMap<usize, u64>,
    pub by_client: BTreeMap<String, (u64, u64)>,
    pub backends: BTreeMap<String, BackendAnswers>,
    pub slow: Vec<SlowAnswer>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.failures.extend(other.failures);
        self.clean_closes += other.clean_closes;
        self.close_responses += other.close_responses;
        for (phase, n) in other.ok_by_phase {
            *self.ok_by_phase.entry(phase).or_default() += n;
        }
        for (client, (ok, failed)) in other.by_client {
            let entry = self.by_client.entry(client).or_default();
            entry.0 += ok;
            entry.1 += failed;
        }
        for (backend, b) in other.backends {
            let entry = self
                .backends
                .entry(backend)
                .or_insert_with(|| BackendAnswers {
                    first_ms: u64::MAX,
                    ..BackendAnswers::default()
                });
            for g in b.greetings {
                if !entry.greetings.contains(&g) {
                    entry.greetings.push(g);
                }
            }
            entry.count += b.count;
            entry.first_ms = entry.first_ms.min(b.first_ms);
            entry.last_ms = entry.last_ms.max(b.last_ms);
        }
        self.slow.extend(other.slow);
    }

    /// Failures by kind.
    pub fn failures_by_kind(&self) -> BTreeMap<FailureKind, usize> {
        let mut out = BTreeMap::new();
        for f in &self.failures {
            *out.entry(f.kind).or_default() += 1;
        }
        out
    }

    /// A printable summary; `phase_name` names a phase.
    pub fn summary(&self, phase_name: &dyn Fn(usize) -> String) -> String {
        let mut out = format!(
            "requests {}, ok {}, failed {}; idle keep-alive connections closed cleanly by the server (reconnected, not failures): {}; `Connection: close` responses: {}\n",
            self.requests,
            self.ok,
            self.failures.len(),
            self.clean_closes,
            self.close_responses
        );
        for (client, (ok, failed)) in &self.by_client {
            out.push_str(&format!("  client {client}: {ok} ok, {failed} failed\n"));
        }
        let kinds = self.failures_by_kind();
        if kinds.is_empty() {
            out.push_str("  failures by kind: none\n");
        } else {
            out.push_str("  failures by kind:\n");
            for (kind, n) in &kinds {
                out.push_str(&format!("    {n} × {kind}\n"));
            }
            // Count, first and last failure time.
            let mut by_phase: BTreeMap<usize, (usize, u64, u64)> = BTreeMap::new();
            for f in &self.failures {
                let e = by_phase.entry(f.phase).or_insert((0, f.at_ms, f.at_ms));
                e.0 += 1;
                e.1 = e.1.min(f.at_ms);
                e.2 = e.2.max(f.at_ms);
            }
            out.push_str("  failures by phase (and the time from the first to the last):\n");
            for (phase, (n, first, last)) in &by_phase {
                out.push_str(&format!(
                    "    {n} during {} ({} ms)\n",
                    phase_name(*phase),
                    last - first
                ));
            }
            out.push_str("  first failures:\n");
            for f in self.failures.iter().take(40) {
                out.push_str(&format!(
                    "    [{}, {} ms after sending] {} ({}): {} — {}\n",
                    f.at_ms,
                    f.at_ms - f.sent_ms,
                    f.kind,
                    f.client,
                    phase_name(f.phase),
                    f.detail
                ));
            }
        }
        out
    }
}

/// Running clients; [`Load::finish`] stops them and gathers their reports.
pub struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Report>>,
}

impl Load {
    /// Starts one thread per client against `addr`.
    pub fn start(addr: SocketAddr, clients: &[Client], check: &Check) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let threads = clients
            .iter()
            .map(|client| {
                let worker = Worker {
                    addr,
                    client: client.clone(),
                    check: check.clone(),
                    stop: stop.clone(),
                    phase: phase.clone(),
                    report: Report::default(),
                };
                std::thread::Builder::new()
                    .name(format!("load-{}", client.name))
                    .spawn(move || worker.run())
                    .expect("a load thread starts")
            })
            .collect();
        Load {
            stop,
            phase,
            threads,
        }
    }

    /// Requests sent from now on belong to `phase`.
    pub fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stops every client (each finishes the request it is sending) and
    /// merges their reports.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut report = Report::default();
        for t in std::mem::take(&mut self.threads) {
            report.merge(t.join().expect("a load thread does not panic"));
        }
        report.failures.sort_by_key(|f| (f.at_ms, f.client.clone()));
        report.slow.sort_by_key(|s| s.sent_ms);
        report
    }
}

impl Drop for Load {
    /// A test that panics stops its clients too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Worker {
    addr: SocketAddr,
    client: Client,
    check: Check,
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    report: Report,
}

/// How one attempt ended.
enum Outcome {
    Answer(Answerer, bool),
    Failed(FailureKind, String),
}

impl Worker {
    fn run(mut self) -> Report {
        let mut conn: Option<BufReader<TcpStream>> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let phase = self.phase.load(Ordering::SeqCst);
            let sent_ms = now_ms();
            let outcome = self.once(&mut conn);
            let at_ms = now_ms();
            self.report.requests += 1;
            match outcome {
                Outcome::Answer(answerer, close) => {
                    self.report.ok += 1;
                    *self.report.ok_by_phase.entry(phase).or_default() += 1;
                    self.report
                        .by_client
                        .entry(self.client.name.clone())
                        .or_default()
                        .0 += 1;
                    if close {
                        conn = None;
                        if self.client.mode == Mode::KeepAlive {
                            self.report.close_responses += 1;
                        }
                    }
                    if self.client.path.starts_with("/slow") {
                        self.report.slow.push(SlowAnswer {
                            backend: answerer.backend.clone(),
                            sent_ms,
                            done_ms: at_ms,
                        });
                    }
                    let b = self
                        .report
                        .backends
                        .entry(answerer.backend)
                        .or_insert_with(|| BackendAnswers {
                            first_ms: at_ms,
                            ..BackendAnswers::default()
                        });
                    if !b.greetings.contains(&answerer.greeting) {
                        b.greetings.push(answerer.greeting);
                    }
                    b.count += 1;
                    b.last_ms = at_ms;
                }
                Outcome::Failed(kind, detail) => {
                    conn = None;
                    self.report
                        .by_client
                        .entry(self.client.name.clone())
                        .or_default()
                        .1 += 1;
                    self.report.failures.push(Failure {
                        kind,
                        client: self.client.name.clone(),
                        phase,
                        sent_ms,
                        at_ms,
                        detail,
                    });
                    // Do not spin on a port that refuses.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if self.client.mode == Mode::Fresh {
                conn = None;
            }
            std::thread::sleep(self.client.pause);
        }
        self.report
    }

    fn connect(&self) -> Result<BufReader<TcpStream>, String> {
        let stream = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(BufReader::new(stream))
    }

    /// One request: reuses `conn` if it is still open (a clean close while
    /// idle reconnects), else connects.
    fn once(&mut self, conn: &mut Option<BufReader<TcpStream>>) -> Outcome {
        if let Some(reader) = conn.as_mut() {
            match idle_state(reader) {
                Idle::Open => {}
                Idle::CleanlyClosed => {
                    self.report.clean_closes += 1;
                    *conn = None;
                }
                Idle::Reset(e) => {
                    return Outcome::Failed(
                        FailureKind::IdleReset,
                        format!("kept-alive connection: {e}"),
                    );
                }
                Idle::Unsolicited(n) => {
                    return Outcome::Failed(
                        FailureKind::Unsolicited,
                        format!("{n} byte(s) waiting on an idle connection"),
                    );
                }
            }
        }
        if conn.is_none() {
            match self.connect() {
                Ok(c) => *conn = Some(c),
                Err(e) => return Outcome::Failed(FailureKind::Connect, e),
            }
        }
        let reader = conn.as_mut().expect("connected");
        let close = match self.client.mode {
            Mode::KeepAlive => "",
            Mode::Fresh => "Connection: close\r\n",
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kiln-zero-loss\r\n{close}\r\n",
            self.client.path, self.addr
        );
        if let Err(e) = reader.get_mut().write_all(request.as_bytes()) {
            let kind = if is_reset(&e) {
                FailureKind::Reset
            } else {
                FailureKind::Write
            };
            return Outcome::Failed(kind, format!("write: {e}"));
        }
        let response = match read_response(reader) {
            Ok(r) => r,
            Err((kind, detail)) => return Outcome::Failed(kind, detail),
        };
        if response.status != 200 {
            return Outcome::Failed(
                FailureKind::Status(response.status),
                format!(
                    "backend {:?}, body {:?}",
                    response.header("x-kiln-backend"),
                    response.body
                ),
            );
        }
        let server_closes = response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        match (self.check)(&response) {
            Ok(answerer) => Outcome::Answer(answerer, server_closes),
            Err(why) => Outcome::Failed(FailureKind::WrongAnswer, why),
        }
    }
}

enum Idle {
    Open,
    CleanlyClosed,
    Reset(std::io::Error),
    Unsolicited(usize),
}

/// Whether an idle kept-alive connection is still usable, without blocking.
fn idle_state(reader: &mut BufReader<TcpStream>) -> Idle {
    if !reader.buffer().is_empty() {
        return Idle::Unsolicited(reader.buffer().len());
    }
    let stream = reader.get_ref();
    if let Err(e) = stream.set_nonblocking(true) {
        return Idle::Reset(e);
    }
    let mut byte = [0u8; 1];
    let state = match stream.peek(&mut byte) {
        Ok(0) => Idle::CleanlyClosed,
        Ok(n) => Idle::Unsolicited(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Idle::Open,
        Err(e) => Idle::Reset(e),
    };
    if let Err(e) = stream.set_nonblocking(false) {
        return Idle::Reset(e);
    }
    state
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

fn io_failure(e: &std::io::Error, started: bool, what: &str) -> (FailureKind, String) {
    let kind = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        FailureKind::Timeout
    } else if is_reset(e) {
        FailureKind::Reset
    } else if started {
        FailureKind::ShortRead
    } else {
        FailureKind::Reset
    };
    (kind, format!("{what}: {e}"))
}

/// Reads one response (head, then a `Content-Length` or chunked body).
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<Response, (FailureKind, String)> {
    let mut status_line = String::new();
    match reader.read_line(&mut status_line) {
        Ok(0) => {
            return Err((
                FailureKind::Eof,
                "connection closed before any byte of the response".into(),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(io_failure(&e, false, "reading the status line")),
    }
    if !status_line.ends_with('\n') {
        return Err((
            FailureKind::ShortRead,
            format!("status line cut: {status_line:?}"),
        ));
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| {
            (
                FailureKind::Malformed,
                format!("status line {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Err((
                    FailureKind::ShortRead,
                    format!("EOF in the head after {status_line:?}"),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(io_failure(&e, true, "reading the head")),
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| (FailureKind::Malformed, format!("header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        read_chunked(reader)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| (FailureKind::Malformed, format!("content-length {len:?}")))?;
        let mut body = vec![0; len];
        reader
            .read_exact(&mut body)
            .map_err(|e| io_failure(&e, true, &format!("reading a {len}-byte body")))?;
        body
    } else {
        // HTTP/1.1 without a length: the body runs to the end of the
        // connection. Our server always sends a length; say so.
        return Err((
            FailureKind::Malformed,
            format!("no content-length and not chunked (status {status})"),
        ));
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, (FailureKind, String)> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        match reader.read_line(&mut size) {
            Ok(0) => return Err((FailureKind::ShortRead, "EOF in a chunked body".into())),
            Ok(_) => {}
            Err(e) => return Err(io_failure(&e, true, "reading a chunk size")),
        }
        let size = size.trim_end();
        let size = size.split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| (FailureKind::Malformed, format!("chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => return Err((FailureKind::ShortRead, "EOF in trailers".into())),
                    Ok(_) if line.trim_end().is_empty() => return Ok(body),
                    Ok(_) => {}
                    Err(e) => return Err(io_failure(&e, true, "reading trailers")),
                }
            }
        }
        let mut chunk = vec![0; size + 2];
        reader
            .read_exact(&mut chunk)
            .map_err(|e| io_failure(&e, true, "reading a chunk"))?;
        chunk.truncate(size);
        body.extend(chunk);
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
