//! Handing the proxy's listening sockets to a new daemon, so that upgrading
//! kiln drops no connection.
//!
//! `kiln daemon --takeover` (the new process) binds a private Unix socket
//! and asks the running daemon for a [`crate::api::Request::Handover`]. The
//! old daemon, holding the rollout lock so no change is in flight, sends
//! one line of JSON (the route names, in order) with a duplicate of each
//! route's listening socket attached (`SCM_RIGHTS`), stops accepting, gives
//! up the daemon lease and exits once its open connections have finished.
//! The new daemon takes the lease, adopts the instances and serves each
//! route on the socket it was handed. The sockets never close, so
//! connections the old daemon had not accepted yet wait in the same accept
//! queue for the new one.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// At most this many routes are handed over in one message.
const MAX_ROUTES: usize = 250;

/// The old daemon's side: sends `listeners` to the new daemon waiting on
/// `socket`.
pub fn send(socket: &Path, listeners: &[(String, std::net::TcpListener)]) -> Result<(), String> {
    if listeners.len() > MAX_ROUTES {
        return Err(format!(
            "more than {MAX_ROUTES} routes cannot be handed over"
        ));
    }
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the new daemon on {}: {e}", socket.display()))?;
    let names: Vec<&str> = listeners.iter().map(|(n, _)| n.as_str()).collect();
    let mut header = serde_json::to_vec(&names).expect("names serialise");
    header.push(b'\n');
    let fds: Vec<_> = listeners.iter().map(|(_, l)| l.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ROUTES))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err("the sockets do not fit in one message".into());
    }
    let sent = sendmsg(
        &stream,
        &[IoSlice::new(&header)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| format!("cannot send the sockets: {e}"))?;
    if sent != header.len() {
        return Err("the route names were cut short".into());
    }
    Ok(())
}

/// The new daemon's side: waits (up to `timeout`) on `listener` for the
/// old daemon's message and returns the listening sockets by route name.
pub fn receive(
    listener: &UnixListener,
    timeout: Duration,
) -> Result<BTreeMap<String, std::net::TcpListener>, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot poll the handover socket: {e}"))?;
    let started = std::time::Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > timeout {
                    return Err("the running daemon did not hand its sockets over in time".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot accept the handover: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(|e| format!("cannot read the handover: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ROUTES))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| format!("cannot receive the sockets: {e}"))?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let header = buf[..got.bytes.min(buf.len())]
        .split(|b| *b == b'\n')
        .next()
        .unwrap_or_default();
    let names: Vec<String> = serde_json::from_slice(header)
        .map_err(|e| format!("the handover message is not understood: {e}"))?;
    if names.len() != fds.len() {
        return Err(format!(
            "the handover named {} routes but carried {} sockets",
            names.len(),
            fds.len()
        ));
    }
    Ok(names
        .into_iter()
        .zip(fds)
        .map(|(name, fd)| (name, std::net::TcpListener::from(fd)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_travel_and_keep_their_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let receiver = UnixListener::bind(&path).unwrap();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // A client connects before the handover: it must be accepted after.
        let _early = std::net::TcpStream::connect(a_addr).unwrap();
        let sent = vec![("web".to_owned(), a), ("api".to_owned(), b)];
        let sender = std::thread::spawn(move || send(&path, &sent));
        let got = receive(&receiver, Duration::from_secs(30)).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(got["web"].local_addr().unwrap(), a_addr);
        assert_eq!(got["api"].local_addr().unwrap(), b_addr);
        let (_conn, _) = got["web"]
            .accept()
            .expect("the early connection waited in the queue");
    }
}
