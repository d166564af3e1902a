//! Deterministic gzip on every core (pigz's scheme).
//!
//! The input is cut into fixed [`CHUNK`]-byte pieces; each is raw-deflated
//! on a worker thread with the 32 KiB of input before it as the dictionary,
//! and ended with a sync flush (the last one with the final block), so the
//! pieces concatenate into one ordinary deflate stream inside one gzip
//! member. The bytes depend only on the input and the level — never on the
//! number of threads or their timing — because every piece is compressed
//! from the same (dictionary, data) pair whoever does it.
//!
//! The header is fixed: mtime 0, no name, XFL 0 (2 at level 9, 4 at level
//! 1, as zlib writes), OS 255 ("unknown"). `flate2`'s `GzDecoder`, Go's
//! `compress/gzip` (Docker, umoci, skopeo) and GNU gzip read the result.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc;
use std::thread;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// Input bytes per independently compressed piece.
pub const CHUNK: usize = 1 << 20;
/// The deflate window: how much earlier input primes each piece.
const DICT: usize = 32 << 10;

struct Job {
    index: u64,
    dict: Vec<u8>,
    data: Vec<u8>,
    last: bool,
}

/// A gzip writer that compresses pieces in parallel. Call
/// [`ParallelGz::finish`] to write the trailer and get the output back.
pub struct ParallelGz<W: Write> {
    /// `None` only after `finish`.
    out: Option<W>,
    level: u32,
    chunk: Vec<u8>,
    /// The last [`DICT`] bytes of input handed out so far.
    window: Vec<u8>,
    crc: Crc,
    sent: u64,
    written: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    jobs: Option<mpsc::SyncSender<Job>>,
    results: mpsc::Receiver<(u64, io::Result<Vec<u8>>)>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl<W: Write> std::fmt::Debug for ParallelGz<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelGz")
            .field("level", &self.level)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl<W: Write> ParallelGz<W> {
    /// Starts a gzip member on `out` at `level` (0–9) using `threads`
    /// workers (at least one).
    pub fn new(mut out: W, level: u32, threads: usize) -> io::Result<ParallelGz<W>> {
        let xfl = match level {
            9 => 2,
            1 => 4,
            _ => 0,
        };
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255])?;
        let threads = threads.max(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads * 2);
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let (res_tx, results) = mpsc::channel();
        let workers = (0..threads)
            .map(|_| {
                let job_rx = job_rx.clone();
                let res_tx = res_tx.clone();
                thread::spawn(move || {
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let out = deflate_piece(level, &job);
                        if res_tx.send((job.index, out)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Ok(ParallelGz {
            out: Some(out),
            level,
            chunk: Vec::with_capacity(CHUNK),
            window: Vec::new(),
            crc: Crc::new(),
            sent: 0,
            written: 0,
            pending: BTreeMap::new(),
            jobs: Some(job_tx),
            results,
            workers,
        })
    }

    fn send(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        let dict = std::mem::take(&mut self.window);
        // The next piece's dictionary: the end of this input (and of the
        // previous one when this piece is shorter than the window).
        let mut window = if data.len() >= DICT {
            Vec::new()
        } else {
            dict[dict.len().saturating_sub(DICT - data.len())..].to_vec()
        };
        window.extend_from_slice(&data[data.len().saturating_sub(DICT)..]);
        self.window = window;
        let job = Job {
            index: self.sent,
            dict,
            data,
            last,
        };
        self.sent += 1;
        // While the queue is full, write finished pieces out.
        let mut job = Some(job);
        while let Some(j) = job.take() {
            let jobs = self.jobs.as_ref().expect("jobs are open until finish");
            match jobs.try_send(j) {
                Ok(()) => {}
                Err(mpsc::TrySendError::Full(j)) => {
                    job = Some(j);
                    self.receive_one()?;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(io::Error::other("gzip workers stopped"));
                }
            }
        }
        self.drain(false)
    }

    /// Waits for one result and writes every piece that is next in order.
    fn receive_one(&mut self) -> io::Result<()> {
        let (index, out) = self
            .results
            .recv()
            .map_err(|_| io::Error::other("gzip workers stopped"))?;
        self.pending.insert(index, out?);
        self.flush_ready()
    }

    fn flush_ready(&mut self) -> io::Result<()> {
        while let Some(piece) = self.pending.remove(&self.written) {
            self.out().write_all(&piece)?;
            self.written += 1;
        }
        Ok(())
    }

    /// Writes what is ready; with `all`, waits for everything sent.
    fn drain(&mut self, all: bool) -> io::Result<()> {
        while let Ok((index, out)) = self.results.try_recv() {
            self.pending.insert(index, out?);
        }
        self.flush_ready()?;
        while all && self.written < self.sent {
            self.receive_one()?;
        }
        Ok(())
    }

    /// Compresses what is left, writes the trailer, stops the workers and
    /// returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.send(true)?;
        self.drain(true)?;
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let (sum, amount) = (self.crc.sum(), self.crc.amount());
        let mut out = self.out.take().expect("finish runs once");
        out.write_all(&sum.to_le_bytes())?;
        out.write_all(&amount.to_le_bytes())?;
        Ok(out)
    }

    fn out(&mut self) -> &mut W {
        self.out.as_mut().expect("output is there until finish")
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.chunk.len() == CHUNK {
            self.send(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGz<W> {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Raw deflate of one piece, primed with `dict`, ending on a byte boundary
/// (sync flush) or with the final block.
fn deflate_piece(level: u32, job: &Job) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    if !job.dict.is_empty() {
        c.set_dictionary(&job.dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(job.data.len() / 2 + 1024);
    let flush = if job.last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 64 * 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let status = c
            .compress_vec(&job.data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let done_input = c.total_in() as usize == job.data.len();
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete once all input is in and the output
            // buffer was not filled up.
            _ if !job.last && done_input && out.len() < out.capacity() => break,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        let mut seed = 7u64;
        (0..len)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if (i / 5000) % 2 == 0 {
                    (seed % 7) as u8 + b'a'
                } else {
                    seed as u8
                }
            })
            .collect()
    }

    fn gz(data: &[u8], threads: usize, writes: usize) -> Vec<u8> {
        let mut w = ParallelGz::new(Vec::new(), 6, threads).unwrap();
        for part in data.chunks(writes.max(1)) {
            w.write_all(part).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_and_does_not_depend_on_threads_or_write_sizes() {
        for len in [
            0,
            1,
            DICT - 1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 12_345,
        ] {
            let data = sample(len);
            let one = gz(&data, 1, 4096);
            assert_eq!(one, gz(&data, 3, 777_777), "len {len}");
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&one[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "len {len}: round trip");
        }
    }

    #[test]
    fn compresses_about_as_well_as_one_stream() {
        let data = sample(4 * CHUNK);
        let parallel = gz(&data, 2, 65536).len();
        let mut single = flate2::write::GzEncoder::new(Vec::new(), Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap().len();
        assert!(
            parallel as f64 <= single as f64 * 1.01,
            "{parallel} vs {single}"
        );
    }

    #[test]
    fn gnu_gzip_reads_it() {
        let Ok(mut child) = std::process::Command::new("gzip")
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("gzip is part of every Debian system");
        };
        let data = sample(2 * CHUNK + 99);
        let compressed = gz(&data, 2, 100_000);
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&compressed));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success());
        assert!(out.stdout == data);
    }
}
