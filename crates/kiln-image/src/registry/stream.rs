//! The readers a blob goes through on its way to or from a registry:
//! verified and size-checked, reporting progress.

use std::io::{self, Read};

use super::{BlobKind, Event, Progress};
use crate::digest::Digest;
use crate::error::ImageError;
use crate::store::VerifiedReader;

/// The body of a blob upload: reads exactly `size` bytes from the store's
/// verified reader and, with the last byte, reads on to the end so the
/// verification runs before the body is complete: a corrupt local blob fails
/// the upload instead of being sent whole. A failure is kept in `failure`
/// (ureq only passes an I/O error on).
pub(super) struct UploadReader<'a, 'p> {
    pub(super) inner: VerifiedReader,
    pub(super) remaining: u64,
    pub(super) size: u64,
    pub(super) failure: Option<ImageError>,
    pub(super) progress: Option<&'a mut (dyn FnMut(&Progress<'_>) + 'p)>,
    pub(super) kind: BlobKind,
    pub(super) digest: &'a Digest,
}

impl UploadReader<'_, '_> {
    fn fail(&mut self, failure: ImageError) -> io::Error {
        self.failure = Some(failure);
        io::Error::other("reading the blob from the store failed")
    }
}

impl Read for UploadReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                let done = self.size - self.remaining;
                return Err(self.fail(ImageError::Invalid(format!(
                    "blob {} is {done} bytes, but its manifest says {}",
                    self.digest, self.size
                ))));
            }
            Ok(n) => n,
            Err(e) => {
                let failure = self.inner.error(e);
                return Err(self.fail(failure));
            }
        };
        self.remaining -= n as u64;
        if self.remaining == 0 {
            match self.inner.read(&mut [0u8; 1]) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(self.fail(ImageError::Invalid(format!(
                        "blob {} is longer than the {} bytes its manifest says",
                        self.digest, self.size
                    ))));
                }
                Err(e) => {
                    let failure = self.inner.error(e);
                    return Err(self.fail(failure));
                }
            }
        }
        if let Some(progress) = self.progress.as_mut() {
            progress(&Progress {
                kind: self.kind,
                digest: self.digest,
                event: Event::Transferring,
                done: self.size - self.remaining,
                total: self.size,
            });
        }
        Ok(n)
    }
}

/// A blob download: counts bytes for progress and stops one byte past the
/// descriptor's size, so an endless body cannot fill the disk.
pub(super) struct DownloadReader<'a, 'p, R> {
    pub(super) inner: R,
    pub(super) read: u64,
    pub(super) limit: u64,
    /// A network error (kept: the store reports reader and disk errors alike).
    pub(super) failure: Option<io::Error>,
    pub(super) progress: Option<&'a mut (dyn FnMut(&Progress<'_>) + 'p)>,
    pub(super) kind: BlobKind,
    pub(super) digest: &'a Digest,
}

impl<R: Read> Read for DownloadReader<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read > self.limit {
            return Ok(0);
        }
        let room = usize::try_from(self.limit + 1 - self.read).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failure = Some(e);
                return Err(copy);
            }
        };
        self.read += n as u64;
        if n > 0
            && let Some(progress) = self.progress.as_mut()
        {
            progress(&Progress {
                kind: self.kind,
                digest: self.digest,
                event: Event::Transferring,
                done: self.read.min(self.limit),
                total: self.limit,
            });
        }
        Ok(n)
    }
}
