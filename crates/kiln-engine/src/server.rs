//! The daemon: the engine behind the HTTP API on a Unix socket.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::api::{Reply, Request, SOCKET_FILE, exit};
use crate::engine::{Engine, EngineOptions, Progress};
use crate::project::EngineError;

/// Starts the engine and serves the API until [`Engine::stop`] (or the
/// `Down` action). The socket is `<state_dir>/kiln.sock`, mode 0600.
pub async fn serve(opts: EngineOptions) -> Result<Arc<Engine>, EngineError> {
    let socket = opts.state_dir.join(SOCKET_FILE);
    std::fs::create_dir_all(&opts.state_dir).map_err(|e| EngineError::Io {
        what: format!("create {}", opts.state_dir.display()),
        source: e,
    })?;
    let mut inherited = std::collections::BTreeMap::new();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        if !opts.takeover {
            return Err(EngineError::Busy(format!(
                "a kiln daemon already answers on {}\n  hint: `kiln status` talks to it; `kiln down` stops it; `kiln daemon --takeover` replaces it without dropping a connection",
                socket.display()
            )));
        }
        inherited = take_over(&opts.state_dir, &socket).await?;
    }
    let engine = Engine::start_with(opts, inherited).await?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| EngineError::Io {
        what: format!("listen on {}", socket.display()),
        source: e,
    })?;
    let inode = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        EngineError::Io {
            what: format!("restrict {}", socket.display()),
            source: e,
        }
    })?;
    tokio::spawn(accept(listener, engine.clone(), socket, inode));
    Ok(engine)
}

/// Asks the daemon on `socket` for its listening sockets (see
/// `handover.rs`).
async fn take_over(
    state_dir: &Path,
    socket: &Path,
) -> Result<std::collections::BTreeMap<String, std::net::TcpListener>, EngineError> {
    let private = state_dir.join(format!("handover-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&private);
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| EngineError::Io { what, source }
    };
    let listener =
        std::os::unix::net::UnixListener::bind(&private).map_err(io("bind the handover socket"))?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restrict the handover socket"))?;
    let client = crate::client::Client::new(socket);
    let request = Request::Handover {
        socket: private.clone(),
    };
    let asked = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for reply in client.call(&request).map_err(|e| e.to_string())? {
            if let Reply::Failed { message, .. } = reply.map_err(|e| e.to_string())? {
                return Err(message);
            }
        }
        Ok(())
    });
    let received = tokio::task::spawn_blocking(move || {
        crate::handover::receive(&listener, Duration::from_secs(30))
    })
    .await
    .expect("receiving does not panic");
    let _ = std::fs::remove_file(&private);
    let asked = asked.await.expect("asking does not panic");
    match (received, asked) {
        (Ok(listeners), _) => Ok(listeners),
        (Err(e), asked) => Err(EngineError::Busy(format!(
            "cannot take over from the running daemon: {e}{}",
            asked.err().map(|w| format!(" ({w})")).unwrap_or_default()
        ))),
    }
}

async fn accept(listener: UnixListener, engine: Arc<Engine>, socket: PathBuf, inode: Option<u64>) {
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let engine = engine.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(engine.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = engine.stopped() => break,
        }
    }
    // Only if it is still ours: a daemon that took over may have bound a
    // new socket at the same path already.
    let ours = std::fs::metadata(&socket)
        .map(|m| Some(std::os::unix::fs::MetadataExt::ino(&m)) == inode)
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(&socket);
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(
    engine: Arc<Engine>,
    req: http::Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => Ok(Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(full(engine.proxy().metrics_text()))
            .expect("valid response")),
        (&Method::POST, "/v1/action") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, e.to_string())),
            };
            let request: Request = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, format!("bad request: {e}"))),
            };
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(engine, request, tx));
            Ok(Response::builder()
                .header("content-type", "application/x-ndjson")
                .body(BoxBody::new(Lines(rx)))
                .expect("valid response"))
        }
        _ => Ok(error(StatusCode::NOT_FOUND, "no such endpoint".into())),
    }
}

/// Runs one action, sending its replies.
async fn run(engine: Arc<Engine>, request: Request, tx: Progress) {
    let done = |r: Result<Reply, crate::rollout::Refusal>| match r {
        Ok(reply) => reply,
        Err(refusal) => Reply::Failed {
            message: refusal.message,
            code: refusal.code,
        },
    };
    let failed = |e: EngineError| Reply::Failed {
        message: e.to_string(),
        code: exit::FAILED,
    };
    let last = match request {
        Request::Plan { generation } => match engine.plan_for(&generation) {
            Ok(plan) => Reply::Plan {
                plan: Box::new(plan),
                generation: engine
                    .store()
                    .active_generation()
                    .ok()
                    .flatten()
                    .map(|g| g.number),
            },
            Err(e) => failed(e),
        },
        Request::Apply {
            generation,
            secrets,
            message,
            wait,
        } => done(engine.apply(*generation, secrets, message, wait, &tx).await),
        Request::Rollback { to, wait } => done(engine.rollback(to, wait, &tx).await),
        Request::Status => match engine.status().await {
            Ok(status) => Reply::Status {
                status: Box::new(status),
            },
            Err(e) => failed(e),
        },
        Request::Verify => {
            let findings = engine.check_drift(false).await;
            let drifted = !findings.is_empty();
            let _ = tx.send(Reply::Drift { findings });
            if drifted {
                Reply::Failed {
                    message: "drift found".into(),
                    code: exit::DRIFT,
                }
            } else {
                Reply::Done {
                    message: "No drift: every instance is as declared.".into(),
                    generation: None,
                }
            }
        }
        Request::Events { follow, since } => {
            // Subscribe before reading the history, so nothing falls between.
            let mut live = engine.subscribe_events();
            let filter = kiln_state::EventFilter {
                since_seq: since,
                ..Default::default()
            };
            let mut last_seq = since.unwrap_or(0);
            match engine.store().list_events(&filter) {
                Ok(events) => {
                    for e in events {
                        last_seq = e.seq;
                        if tx.send(Reply::Event { event: e.into() }).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(failed(e.into()));
                    return;
                }
            }
            if !follow {
                Reply::Done {
                    message: String::new(),
                    generation: None,
                }
            } else {
                loop {
                    tokio::select! {
                        got = live.recv() => match got {
                            Ok(mut e) if e.seq > last_seq => {
                                last_seq = e.seq;
                                if e.at.is_empty() {
                                    e.at = now_text();
                                }
                                if tx.send(Reply::Event { event: e }).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        },
                        () = tx.closed() => return,
                        () = engine.stopped() => return,
                    }
                }
            }
        }
        Request::Logs {
            service,
            follow,
            tail,
        } => match logs(&engine, &service, follow, tail, &tx).await {
            Ok(()) => Reply::Done {
                message: String::new(),
                generation: None,
            },
            Err(message) => Reply::Failed {
                message,
                code: exit::USAGE,
            },
        },
        Request::Handover { socket } => {
            // No change may be in flight while the sockets move, and none
            // may start after: the lock is held until this daemon stops.
            let _guard = engine.rollout.lock().await;
            // One socket per address: routes sharing one (by host) find it
            // by address in the new daemon.
            let mut addresses = std::collections::HashSet::new();
            let listeners: Vec<(String, std::net::TcpListener)> = engine
                .proxy()
                .routes()
                .into_iter()
                .filter(|(name, _)| {
                    engine
                        .proxy()
                        .local_addr(name)
                        .is_none_or(|a| addresses.insert(a))
                })
                .filter_map(|(name, _)| {
                    engine
                        .proxy()
                        .dup_listener(&name)
                        .and_then(Result::ok)
                        .map(|l| (name, l))
                })
                .collect();
            let sent =
                tokio::task::spawn_blocking(move || crate::handover::send(&socket, &listeners))
                    .await
                    .expect("sending does not panic");
            match sent {
                Ok(()) => {
                    engine.proxy().stop_accepting();
                    engine.event(
                        "daemon.handover",
                        "daemon",
                        None,
                        "listening sockets handed to a new daemon; this one stops (instances keep running)".into(),
                    );
                    engine.stop(false).await;
                    Reply::Done {
                        message: "Handed over.".into(),
                        generation: None,
                    }
                }
                Err(message) => Reply::Failed {
                    message,
                    code: exit::FAILED,
                },
            }
        }
        Request::Down => {
            engine.stop(true).await;
            Reply::Done {
                message: "Every instance stopped; the daemon exits.".into(),
                generation: None,
            }
        }
    };
    let _ = tx.send(last);
}

async fn logs(
    engine: &Arc<Engine>,
    service: &str,
    follow: bool,
    tail: u64,
    tx: &Progress,
) -> Result<(), String> {
    let ids = engine.instances_of(service).map_err(|e| e.to_string())?;
    let declared = engine
        .active_generation()
        .is_some_and(|(_, g)| g.spec.services.contains_key(service));
    if ids.is_empty() && !declared {
        return Err(format!(
            "no service `{service}` runs here\n  hint: `kiln status` lists the services"
        ));
    }
    let mut offsets = Vec::new();
    for id in &ids {
        // Up to 4 KiB per line asked for, then the last `tail` whole lines.
        let budget = tail.saturating_mul(4096).min(16 << 20);
        let (out, err) = engine.logs(id, budget).await.unwrap_or_default();
        for (stream, bytes) in [("stdout", out), ("stderr", err)] {
            let bytes = last_lines(&bytes, tail, bytes.len() as u64 >= budget);
            if !bytes.is_empty() {
                let _ = tx.send(Reply::Log {
                    instance: id.clone(),
                    stream: stream.into(),
                    text: String::from_utf8_lossy(&bytes).into_owned(),
                });
            }
            let path = engine.log_dir(id).join(format!("{stream}.log"));
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            offsets.push((id.clone(), stream, path, len));
        }
    }
    if !follow {
        return Ok(());
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = tx.closed() => return Ok(()),
        }
        // New instances of the service join the stream.
        if let Ok(now) = engine.instances_of(service) {
            for id in now {
                if offsets.iter().all(|(i, ..)| i != &id) {
                    for stream in ["stdout", "stderr"] {
                        let path = engine.log_dir(&id).join(format!("{stream}.log"));
                        offsets.push((id.clone(), stream, path, 0));
                    }
                }
            }
        }
        for (id, stream, path, offset) in &mut offsets {
            let Ok(mut file) = std::fs::File::open(&*path) else {
                continue;
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len < *offset {
                *offset = 0; // rotated
            }
            if len == *offset {
                continue;
            }
            let mut buf = Vec::new();
            if file.seek(SeekFrom::Start(*offset)).is_ok()
                && file.take(1 << 20).read_to_end(&mut buf).is_ok()
            {
                *offset += buf.len() as u64;
                let _ = tx.send(Reply::Log {
                    instance: id.clone(),
                    stream: (*stream).into(),
                    text: String::from_utf8_lossy(&buf).into_owned(),
                });
            }
        }
    }
}

fn now_text() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    kiln_image::config::rfc3339(now.as_secs())
}

fn full(text: String) -> Body {
    BoxBody::new(Full::new(Bytes::from(text)))
}

fn error(status: StatusCode, message: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(full(message))
        .expect("valid response")
}

/// The replies of an action as an HTTP body, one JSON line each.
struct Lines(mpsc::UnboundedReceiver<Reply>);

impl http_body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.poll_recv(cx) {
            Poll::Ready(Some(reply)) => {
                let mut line = serde_json::to_vec(&reply).expect("replies serialise");
                line.push(b'\n');
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The last `n` lines of `bytes`; when `cut` (the read started inside the
/// file), the first line may be partial and is dropped.
fn last_lines(bytes: &[u8], n: u64, cut: bool) -> Vec<u8> {
    let mut start = 0;
    if cut && let Some(i) = bytes.iter().position(|&b| b == b'\n') {
        start = i + 1;
    }
    let body = &bytes[start..];
    let trimmed = body.strip_suffix(b"\n").unwrap_or(body);
    let mut seen = 0;
    let mut from = 0;
    for (i, &b) in trimmed.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                from = i + 1;
                break;
            }
        }
    }
    if n == 0 {
        return Vec::new();
    }
    body[from..].to_vec()
}

#[cfg(test)]
mod last_lines_tests {
    use super::last_lines;

    #[test]
    fn keeps_the_last_whole_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2, false), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2, false), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5, false), b"a\nb\n");
        assert_eq!(last_lines(b"tial\nb\nc\n", 5, true), b"b\nc\n");
        assert_eq!(last_lines(b"a\n", 0, false), b"");
        assert_eq!(last_lines(b"", 3, false), b"");
    }
}
