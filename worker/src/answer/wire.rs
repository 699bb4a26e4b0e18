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
    /// The file `body` is a copy of, and the file offset of `body`'s
    /// first byte (kept as `body` advances): what `sendfile` sends from.
    file: Option<(Arc<File>, u64)>,
}

impl Wire {
    pub(crate) fn new(head: Bytes, body: Bytes) -> Wire {
        Wire { head, body, file: None }
    }

    /// The same bytes, with `body` also at offset `at` of `file`.
    pub(crate) fn with_file(mut self, file: Arc<File>, at: u64) -> Wire {
        self.file = Some((file, at));
        self
    }

    /// Where the body still to send is in its file: (file, offset, length),
    /// once the head is out.
    pub(crate) fn file_part(&self) -> Option<(&File, u64, usize)> {
        let (f, at) = self.file.as_ref()?;
        (self.head.is_empty() && !self.body.is_empty()).then(|| (&**f, *at, self.body.len()))
    }

    /// Whether a file stands behind the body.
    pub(crate) fn has_file(&self) -> bool {
        self.file.is_some() && !self.body.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Drops the first `n` bytes (they were sent).
    pub(crate) fn advance(&mut self, n: usize) {
        let h = n.min(self.head.len());
        self.head.advance(h);
        self.body.advance(n - h);
        if let Some((_, at)) = &mut self.file {
            *at += (n - h) as u64;
        }
    }

    /// The parts still to send, in order.
    pub(crate) fn parts(&self) -> [&[u8]; 2] {
        [&self.head, &self.body]
    }
}

impl Wire {
    /// `r`'s head and its body to send after it (not copied; none for
    /// `head_only`, a HEAD request). A file body is sent by
    /// `Outbound::send_file`, not here.
    pub(crate) fn of_response(r: &crate::Response, head_only: bool, close: bool) -> Wire {
        let head = r.serialize_head(close);
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
        Wire { head: b, body: Bytes::new(), file: None }
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
}
