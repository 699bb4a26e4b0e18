//! Responses through the dispatcher: frames on the control socket, a
//! response cut into frames of at most `MAX_FRAME` bytes, and the
//! worker's own notices (its stop).

use bytes::Bytes;

use super::Outbound;
use crate::proto::{WorkerFrame, FRAME_HEADER_LEN, MAX_FRAME};

impl Outbound {
    /// Sends a response through the dispatcher, in frames of at most
    /// [`MAX_FRAME`] bytes. False when the control socket is gone.
    pub(super) fn via_ctl(&self, conn: u64, seq: u32, bytes: &[u8], close: bool, ask: bool) -> bool {
        let n = bytes.len().div_ceil(MAX_FRAME).max(1);
        let chunks: Box<dyn Iterator<Item = &[u8]>> =
            if bytes.is_empty() { Box::new(std::iter::once(&[][..])) } else { Box::new(bytes.chunks(MAX_FRAME)) };
        for (i, chunk) in chunks.enumerate() {
            let last = i + 1 == n;
            let f =
                WorkerFrame::Response { conn, seq, last, close: last && close, want_lease: last && ask, stream: false };
            if self.ctl.send(frame(f, chunk)).is_err() {
                return false;
            }
        }
        true
    }

    /// Tells the dispatcher this worker reads no more requests.
    pub(crate) fn send_stopped(&self) {
        let _ = self.ctl.send(frame(WorkerFrame::Stopped, &[]));
    }
}

/// Frame `f` with `data` following, as it goes into the control socket.
pub(super) fn frame(f: WorkerFrame, data: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(FRAME_HEADER_LEN + data.len());
    b.extend_from_slice(&f.encode(data.len() as u32).to_bytes());
    b.extend_from_slice(data);
    Bytes::from(b)
}
