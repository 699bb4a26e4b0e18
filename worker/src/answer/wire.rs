//! A response's bytes on their way out: its head and its body kept apart,
//! so a body that is already in memory (a cached file, a handler's
//! `Bytes`) goes into the socket with one vectored send instead of being
//! copied behind its head first. Copying a 1 MiB cached file per response
//! held 300 MB at 256 connections (docs/performance.md).

use std::{fs::File, sync::Arc};

use bytes::{Buf, Bytes};

/// One response's bytes: head then body (either may be empty).
#[derive(Clone, Debug, Default)]
pub(crate) struct Wire {
    head: Bytes,
    body: Bytes,
    /// The file behind the body, and the file offset of the body's next
    /// byte (kept as the body advances): what `sendfile` sends from.
    /// With `body` empty and `file_left` > 0 the body is only in the file
    /// (one too large to hold, read or sent from it as it goes).
    file: Option<(Arc<File>, u64)>,
    file_left: usize,
}

impl Wire {
    pub(crate) fn new(head: Bytes, body: Bytes) -> Wire {
        Wire { head, body, file: None, file_left: 0 }
    }

    /// The same bytes, with `body` also at offset `at` of `file`.
    pub(crate) fn with_file(mut self, file: Arc<File>, at: u64) -> Wire {
        self.file = Some((file, at));
        self
    }

    /// `head`, then `len` bytes of `file` from `at`, not in memory.
    pub(crate) fn of_file(head: Bytes, file: Arc<File>, at: u64, len: usize) -> Wire {
        Wire { head, body: Bytes::new(), file: Some((file, at)), file_left: len }
    }

    /// Where the body still to send is in its file: (file, offset, length),
    /// once the head is out.
    pub(crate) fn file_part(&self) -> Option<(&File, u64, usize)> {
        let (f, at) = self.file.as_ref()?;
        let n = self.body.len() + self.file_left;
        (self.head.is_empty() && n > 0).then(|| (&**f, *at, n))
    }

    /// Whether a file stands behind the body.
    pub(crate) fn has_file(&self) -> bool {
        self.file.is_some() && self.body.len() + self.file_left > 0
    }

    /// Whether some of the body is only in the file (so `parts` does not
    /// hold all of it).
    pub(crate) fn file_only(&self) -> bool {
        self.file_left > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.body.len() + self.file_left
    }

    /// Drops the first `n` bytes (they were sent).
    pub(crate) fn advance(&mut self, n: usize) {
        let h = n.min(self.head.len());
        self.head.advance(h);
        let b = (n - h).min(self.body.len());
        self.body.advance(b);
        let f = (n - h - b).min(self.file_left);
        self.file_left -= f;
        if let Some((_, at)) = &mut self.file {
            *at += (b + f) as u64;
        }
    }

    /// The parts still to send that are in memory, in order (all of them
    /// unless [`Wire::file_only`]).
    pub(crate) fn parts(&self) -> [&[u8]; 2] {
        [&self.head, &self.body]
    }

    /// Copies out the next `n` bytes (fewer where the file ended early),
    /// reading what is only in the file; does not advance.
    pub(crate) fn read_front(&self, n: usize) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::with_capacity(n);
        for p in self.parts() {
            out.extend_from_slice(&p[..p.len().min(n - out.len())]);
        }
        if out.len() < n && self.file_left > 0 {
            let (f, at) = self.file.as_ref().expect("file_left implies a file");
            let start = out.len();
            let want = (n - start).min(self.file_left);
            out.resize(start + want, 0);
            let mut done = 0;
            while done < want {
                match f.read_at(&mut out[start + done..], at + done as u64) {
                    Ok(0) => break,
                    Ok(k) => done += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            out.truncate(start + done);
        }
        Ok(out)
    }
}

impl Wire {
    /// `r`'s head and its body to send after it (not copied; none for
    /// `head_only`, a HEAD request); a file body stays in its file.
    pub(crate) fn of_response(r: &crate::Response, head_only: bool, close: bool) -> Wire {
        let head = r.serialize_head(close);
        if let Some(f) = r.file.as_ref().filter(|_| !head_only && !r.bodiless()) {
            return Wire::of_file(head.into(), f.file.clone(), f.offset, f.len as usize);
        }
        let body = if head_only || r.bodiless() { Bytes::new() } else { r.body.clone() };
        let w = Wire::new(head.into(), body);
        match &r.sendfile {
            Some((f, at)) if !w.body.is_empty() => w.with_file(f.clone(), *at),
            _ => w,
        }
    }
}

impl From<Bytes> for Wire {
    fn from(b: Bytes) -> Wire {
        Wire { head: b, body: Bytes::new(), file: None, file_left: 0 }
    }
}

impl From<Vec<u8>> for Wire {
    fn from(b: Vec<u8>) -> Wire {
        Wire::from(Bytes::from(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_crosses_from_head_to_body() {
        let mut w = Wire::new(Bytes::from_static(b"head"), Bytes::from_static(b"body!"));
        assert_eq!(w.len(), 9);
        w.advance(2);
        assert_eq!(w.parts(), [&b"ad"[..], &b"body!"[..]]);
        w.advance(3);
        assert_eq!(w.parts(), [&b""[..], &b"ody!"[..]]);
        w.advance(4);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn the_file_offset_follows_the_body() {
        let f = Arc::new(File::open("/dev/null").unwrap());
        let mut w = Wire::new(Bytes::from_static(b"head"), Bytes::from_static(b"body!")).with_file(f, 100);
        assert!(w.file_part().is_none(), "the head goes first");
        w.advance(6);
        let (_, at, len) = w.file_part().unwrap();
        assert_eq!((at, len), (102, 3));
    }

    #[test]
    fn a_body_only_in_its_file_is_read_from_it() {
        let path = std::env::temp_dir().join(format!("wire-test-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let mut w = Wire::of_file(Bytes::from_static(b"HD"), f, 3, 5);
        assert_eq!((w.len(), w.file_only()), (7, true));
        assert_eq!(w.read_front(4).unwrap(), b"HD34");
        w.advance(3);
        assert_eq!(w.file_part().map(|(_, at, n)| (at, n)), Some((4, 4)));
        assert_eq!(w.read_front(10).unwrap(), b"4567");
        w.advance(4);
        assert_eq!(w.len(), 0);
    }
}
