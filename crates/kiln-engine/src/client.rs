//! The CLI's side of the API: blocking HTTP/1.1 over the daemon's Unix
//! socket, answers read line by line as they arrive.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no kiln daemon answers on {socket}: {source}\n  hint: start one with `kiln daemon`, or use `kiln up`"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection to the daemon on {socket} broke: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon on {socket} answered something kiln does not understand: {what}")]
    Protocol { socket: PathBuf, what: String },
}

/// A connection target: the daemon's socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether a daemon answers on the socket.
    pub fn is_up(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    /// Sends `request`; the answer is read lazily, reply by reply.
    pub fn call(&self, request: &Request) -> Result<Replies, ClientError> {
        let body = serde_json::to_vec(request).expect("requests serialise");
        self.post("/v1/action", &body)
    }

    /// The proxy's metrics, in Prometheus text format.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let mut stream = self.connect()?;
        let head = "GET /metrics HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n";
        stream
            .write_all(head.as_bytes())
            .map_err(|source| self.io(source))?;
        let mut reader = BufReader::new(stream);
        let chunked = self.read_head(&mut reader)?;
        let mut body = BodyReader::new(reader, chunked);
        let mut text = String::new();
        body.read_to_string(&mut text)
            .map_err(|source| self.io(source))?;
        Ok(text)
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })?;
        // Generous: a rollout streams progress at least every few seconds,
        // and followed streams send keep-alive progress lines.
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(|source| self.io(source))?;
        Ok(stream)
    }

    fn post(&self, path: &str, body: &[u8]) -> Result<Replies, ClientError> {
        let mut stream = self.connect()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(|source| self.io(source))?;
        let mut reader = BufReader::new(stream);
        let chunked = self.read_head(&mut reader)?;
        Ok(Replies {
            body: BufReader::new(BodyReader::new(reader, chunked)),
            socket: self.socket.clone(),
            done: false,
        })
    }

    /// Reads the status line and headers; returns whether the body is chunked.
    fn read_head(&self, reader: &mut BufReader<UnixStream>) -> Result<bool, ClientError> {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|source| self.io(source))?;
        let status = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if !line.starts_with("HTTP/1.") {
            return Err(self.protocol(format!("status line {:?}", line.trim_end())));
        }
        let mut chunked = false;
        loop {
            line.clear();
            reader
                .read_line(&mut line)
                .map_err(|source| self.io(source))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
        if status != "200" {
            return Err(self.protocol(format!("HTTP status {status}")));
        }
        Ok(chunked)
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn protocol(&self, what: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            what,
        }
    }
}

/// The replies to one request, as they arrive.
#[derive(Debug)]
pub struct Replies {
    body: BufReader<BodyReader>,
    socket: PathBuf,
    done: bool,
}

impl Iterator for Replies {
    type Item = Result<Reply, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut line = String::new();
        loop {
            line.clear();
            match self.body.read_line(&mut line) {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) if line.trim().is_empty() => continue,
                Ok(_) => break,
                Err(source) => {
                    self.done = true;
                    return Some(Err(ClientError::Io {
                        socket: self.socket.clone(),
                        source,
                    }));
                }
            }
        }
        Some(
            serde_json::from_str(line.trim_end()).map_err(|e| ClientError::Protocol {
                socket: self.socket.clone(),
                what: format!("{e} in {:?}", line.trim_end()),
            }),
        )
    }
}

/// An HTTP/1.1 body: chunked (decoded here) or delimited by the close.
#[derive(Debug)]
struct BodyReader {
    inner: BufReader<UnixStream>,
    chunked: bool,
    /// Bytes left in the current chunk.
    left: usize,
    finished: bool,
}

impl BodyReader {
    fn new(inner: BufReader<UnixStream>, chunked: bool) -> BodyReader {
        BodyReader {
            inner,
            chunked,
            left: 0,
            finished: false,
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.chunked {
            return self.inner.read(buf);
        }
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            // Skip the CRLF that ends the previous chunk, then read the size.
            while size.trim().is_empty() {
                size.clear();
                if self.inner.read_line(&mut size)? == 0 {
                    self.finished = true;
                    return Ok(0);
                }
            }
            let hex = size.trim().split(';').next().unwrap_or_default();
            self.left = usize::from_str_radix(hex, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {hex:?}"),
                )
            })?;
            if self.left == 0 {
                self.finished = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let read = self.inner.read(&mut buf[..n])?;
        if read == 0 {
            self.finished = true;
        }
        self.left -= read;
        Ok(read)
    }
}
