//! Responses through the dispatcher: frames on the control socket, a
//! response cut into frames of at most `MAX_FRAME` bytes, and the
//! worker's own notices (its stop).

use bytes::Bytes;

use super::wire::Wire;
use super::Outbound;
use crate::proto::{WorkerFrame, FRAME_HEADER_LEN, MAX_FRAME};

impl Outbound {
    /// Sends a response through the dispatcher, in frames of at most
    /// [`MAX_FRAME`] bytes. False when the control socket is gone.
    pub(super) fn via_ctl(&self, conn: u64, seq: u32, bytes: &Wire, close: bool, ask: bool) -> bool {
        let f = |last: bool| WorkerFrame::Response {
            conn,
            seq,
            last,
            close: last && close,
            want_lease: last && ask,
            stream: false,
            upgrade: false,
        };
        if bytes.len() <= MAX_FRAME {
            // The usual case: one frame, head and body copied once.
            let [head, body] = bytes.parts();
            return self.ctl.send(frame_of(f(true), &[head, body])).is_ok();
        }
        let whole = bytes.parts().concat();
        let n = whole.len().div_ceil(MAX_FRAME);
        for (i, chunk) in whole.chunks(MAX_FRAME).enumerate() {
            if self.ctl.send(frame(f(i + 1 == n), chunk)).is_err() {
                return false;
            }
        }
        true
    }

    /// Sends `head`, a 101's, through the dispatcher, which hands the
    /// connection over once it is written ([`crate::proto::LeaseMsg::Tunnel`]).
    pub(crate) fn switch(&self, conn: u64, seq: u32, head: &[u8]) -> bool {
        let f = WorkerFrame::Response {
            conn,
            seq,
            last: true,
            close: false,
            want_lease: false,
            stream: false,
            upgrade: true,
        };
        self.ctl.send(frame(f, head)).is_ok()
    }

    /// Sends `head`, a 101's, with the app's socket `app` and `early` (what
    /// the app sent after it) to the dispatcher on the lease socket
    /// ([`crate::proto::LeaseMsg::Splice`]).
    pub(crate) fn splice(
        &self,
        conn: u64,
        seq: u32,
        head: &[u8],
        early: &[u8],
        app: std::sync::Arc<std::os::fd::OwnedFd>,
        idle: Option<std::time::Duration>,
    ) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let Some(sock) = self.lease_sock.get() else {
            return Err(std::io::Error::other("no lease socket"));
        };
        let idle_secs = idle.map_or(0, |d| d.as_secs().clamp(1, u32::MAX as u64) as u32);
        let m = crate::proto::LeaseMsg::Splice { conn, seq, head_len: head.len() as u32, idle_secs }.encode();
        let iov = [std::io::IoSlice::new(&m), std::io::IoSlice::new(head), std::io::IoSlice::new(early)];
        let fds = [app.as_raw_fd()];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        // Blocking is fine: the dispatcher reads this socket all the time,
        // and a packet this size fits its buffer.
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
            .map(|_| ())
            .map_err(std::io::Error::from)
    }

    /// Tells the dispatcher this worker reads no more requests.
    pub(crate) fn send_stopped(&self) {
        let _ = self.ctl.send(frame(WorkerFrame::Stopped, &[]));
    }
}

/// Frame `f` with `data` following, as it goes into the control socket.
pub(super) fn frame(f: WorkerFrame, data: &[u8]) -> Bytes {
    frame_of(f, &[data])
}

/// Frame `f` with the concatenation of `parts` following.
fn frame_of(f: WorkerFrame, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut b = Vec::with_capacity(FRAME_HEADER_LEN + len);
    b.extend_from_slice(&f.encode(len as u32).to_bytes());
    for p in parts {
        b.extend_from_slice(p);
    }
    Bytes::from(b)
}
