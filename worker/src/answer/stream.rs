//! Streamed responses: a response whose body is not all there when its
//! head is ready goes through the dispatcher in parts, each sent only while
//! what was sent and not yet written to the client is under
//! [`STREAM_WINDOW`]. The dispatcher answers every part it wrote with a
//! `RecordKind::Written` record (read by the control socket's reader, not
//! the puller, so a draining worker's streams keep moving), and aborts the
//! connection's streams when the client goes away.
//!
//! Streams do not use the lease: a response of unknown length written
//! straight into the socket could be cut by a revocation mid-body, and
//! streams are rare next to whole responses. A leased connection gives its
//! lease back before its stream's first part.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use super::lease::LeaseState;
use super::relay::frame;
use super::wire::Wire;
use super::Outbound;
use crate::proto::{WorkerFrame, MAX_FRAME};

/// Bytes of a streamed response sent to the dispatcher and not yet written
/// to the client, past which the handler's body is not polled (so a slow
/// client holds at most this much of it in memory, here and there).
pub(crate) const STREAM_WINDOW: u64 = 256 << 10;

/// One streamed response's flow-control state.
#[derive(Default)]
pub(super) struct Window {
    state: Mutex<WindowState>,
    notify: Notify,
}

#[derive(Default)]
struct WindowState {
    /// Sent and not yet written to the client.
    outstanding: u64,
    /// The connection is gone.
    aborted: bool,
}

/// The streams in flight, by (connection, request).
pub(super) type Streams = Mutex<HashMap<(u64, u32), Arc<Window>>>;

/// Sends one streamed response's parts, in order.
pub(crate) struct StreamTx {
    out: Arc<Outbound>,
    conn: u64,
    seq: u32,
    win: Arc<Window>,
}

impl Outbound {
    /// Starts streaming response `seq` on `conn` (after giving back a lease
    /// held on the connection: the dispatcher writes the stream).
    pub(crate) fn stream(self: &Arc<Self>, conn: u64, seq: u32) -> StreamTx {
        let mut map = self.conns.lock().unwrap();
        match map.get_mut(&conn) {
            Some(LeaseState::Leased(l)) if seq >= l.next => self.release(&mut map, conn),
            Some(LeaseState::Asked { at, sent_after }) if seq > *at => *sent_after = true,
            _ => {}
        }
        drop(map);
        self.open_window(conn, seq)
    }

    /// The flow-control window of response `seq` on `conn` (the lease
    /// state is the caller's business; `conns` may be held).
    fn open_window(self: &Arc<Self>, conn: u64, seq: u32) -> StreamTx {
        let win = Arc::new(Window::default());
        self.streams.lock().unwrap().insert((conn, seq), win.clone());
        StreamTx { out: self.clone(), conn, seq, win }
    }

    /// The dispatcher wrote `bytes` of streamed response `seq` on `conn`.
    pub(crate) fn stream_written(&self, conn: u64, seq: u32, bytes: u64) {
        let Some(w) = self.streams.lock().unwrap().get(&(conn, seq)).cloned() else { return };
        let mut st = w.state.lock().unwrap();
        st.outstanding = st.outstanding.saturating_sub(bytes);
        drop(st);
        w.notify.notify_one();
    }

    /// Connection `conn` is gone: its streams stop.
    pub(crate) fn stream_aborted(&self, conn: u64) {
        let streams = self.streams.lock().unwrap();
        for ((c, _), w) in streams.iter() {
            if *c == conn {
                w.state.lock().unwrap().aborted = true;
                w.notify.notify_one();
            }
        }
    }
}

/// Bytes of a file read per part of its response.
const FILE_PART: u64 = 64 << 10;

/// A whole response larger than this that goes through the dispatcher is
/// sent in window-paced parts rather than as one frame: 256 new
/// connections each fetching a 1 MiB file put 256 MiB of first responses
/// (the ones that ask for the lease) into control-socket frames at once.
const RELAY_WHOLE_MAX: usize = 256 << 10;

impl Outbound {
    /// Sends a whole response through the dispatcher: as one frame when it
    /// is small, otherwise in parts paced by the stream window (a task;
    /// `ask`, on the last part, asks for the lease as a whole response
    /// would).
    pub(super) fn relay(self: &Arc<Self>, conn: u64, seq: u32, bytes: Wire, close: bool, ask: bool) -> bool {
        if bytes.len() <= RELAY_WHOLE_MAX && !bytes.file_only() {
            return self.via_ctl(conn, seq, &bytes, close, ask);
        }
        // Called with `conns` held: the lease state is settled already.
        let mut tx = self.open_window(conn, seq);
        tokio::spawn(async move {
            let mut rest = bytes;
            while rest.len() > 0 {
                let n = rest.len().min(FILE_PART as usize);
                // A body only in its file is read as it goes; one that
                // ended early (or failed) ends the connection short.
                let part = rest.read_front(n).unwrap_or_else(|e| {
                    tracing::warn!(conn, seq, "reading the file being sent: {e}");
                    Vec::new()
                });
                let short = part.len() < n;
                if short {
                    tracing::warn!(conn, seq, "the file being sent ended early; closing");
                }
                rest.advance(n);
                let last = rest.len() == 0 || short;
                if !tx.send_asking(&part, last, close || short, last && ask && !short).await || short {
                    return;
                }
            }
        });
        true
    }
}

impl StreamTx {
    /// Sends the next part (`last` ends the response; `close` then closes
    /// the connection), once the window has room. False when the client
    /// or the dispatcher is gone: stop producing the body.
    pub(crate) async fn send(&mut self, bytes: &[u8], last: bool, close: bool) -> bool {
        self.send_asking(bytes, last, close, false).await
    }

    /// [`StreamTx::send`], asking for the lease with the last part.
    async fn send_asking(&mut self, bytes: &[u8], last: bool, close: bool, want_lease: bool) -> bool {
        loop {
            {
                let mut st = self.win.state.lock().unwrap();
                if st.aborted {
                    return false;
                }
                if st.outstanding < STREAM_WINDOW || last {
                    st.outstanding += bytes.len() as u64;
                    break;
                }
            }
            self.win.notify.notified().await;
        }
        let n = bytes.len().div_ceil(MAX_FRAME).max(1);
        for (i, chunk) in bytes.chunks(MAX_FRAME).chain((bytes.is_empty()).then_some(&[][..])).enumerate() {
            let end = last && i + 1 == n;
            let f = WorkerFrame::Response {
                upgrade: false,
                conn: self.conn,
                seq: self.seq,
                last: end,
                close: end && close,
                want_lease: end && want_lease,
                stream: true,
            };
            if self.out.ctl.send(frame(f, chunk)).is_err() {
                return false;
            }
        }
        true
    }
}

impl Drop for StreamTx {
    fn drop(&mut self) {
        self.out.streams.lock().unwrap().remove(&(self.conn, self.seq));
    }
}
