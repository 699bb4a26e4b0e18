//! Ordered write-back: responses (and parts of them) from any pool or from
//! the dispatcher itself wait here until every earlier response on the
//! connection is written, then go to the socket in request order.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use dispatcher_ebpf::wire::LeaseMsg;
use tokio::io::AsyncWriteExt;

use super::{Conn, Flow, Sock};
use crate::{deliver::Frame, http::local_response};

impl Conn {
    pub(super) async fn on_frame(&mut self, f: Frame) -> Flow {
        if let Some(gen) = f.release {
            return self.on_release(gen, f.seq).await;
        }
        if let Some(a) = &f.ask {
            self.lease_peers.retain(|p| !p.is_closed());
            if !self.lease_peers.iter().any(|p| Arc::ptr_eq(p, a)) {
                self.lease_peers.push(a.clone());
            }
        }
        if let Some(c) = &f.credit {
            if !self.stream_peers.iter().any(|p| p.same(c)) {
                self.stream_peers.push(c.clone());
            }
        }
        if f.seq < self.next {
            if let Some(a) = f.ask {
                // Stale: still answer the ask, or the worker never asks again.
                a.send(LeaseMsg::Deny { conn: self.cookie, from: self.next }, None);
            }
            return Flow::Continue;
        }
        // Somebody other than the lease holder has a response to write
        // (or the holder sent one around its lease): take the lease back.
        self.revoke();
        self.pending.entry(f.seq).or_default().push(f);
        self.flush().await
    }

    /// Writes every response that is next in order.
    pub(super) async fn flush(&mut self) -> Flow {
        while self.lease.is_home() {
            let Some(frames) = self.pending.get_mut(&self.next) else { break };
            let frames = std::mem::take(frames);
            let mut done = None;
            for f in frames {
                if !self.write(&f.data).await {
                    return Flow::Close;
                }
                self.last_progress = Instant::now();
                if let Some(c) = &f.credit {
                    c.written(self.cookie, f.seq, f.data.len() as u64);
                }
                if f.last {
                    done = Some((f.close, f.ask, f.tunnel));
                    break;
                }
            }
            let Some((close, ask, tunnel)) = done else { break };
            let upgrade = self.slow.as_ref().and_then(|s| s.upgrade).is_some_and(|u| u == self.next);
            self.pending.remove(&self.next);
            if let Some(s) = self.sent.remove(&self.next) {
                s.link.release(s.bytes);
            }
            self.next += 1;
            self.replay_due |= !self.deferred.is_empty();
            if upgrade {
                match tunnel {
                    Some(crate::deliver::Tunnel::Worker(to)) => return self.hand_over(to),
                    Some(crate::deliver::Tunnel::Splice(s)) => return self.splice_over(s).await,
                    // Declined: what the client sent since is HTTP again.
                    None => {
                        if let Some(s) = &mut self.slow {
                            s.upgrade = None;
                        }
                        self.resume_due = true;
                    }
                }
            }
            if close {
                if let Sock::Polled(s) = &mut self.sock {
                    let _ = s.shutdown().await;
                }
                return Flow::Close;
            }
            if let Some(to) = ask {
                self.answer_ask(to);
            }
        }
        Flow::Continue
    }

    /// The 101 is written: the connection is `to`'s worker's from here
    /// (`LeaseMsg::Tunnel`), with what the client sent after its request.
    /// This task forgets it without closing it.
    fn hand_over(&mut self, to: Arc<crate::deliver::LeaseTx>) -> Flow {
        let early = self.slow.as_mut().map(|s| s.parser.take_rest()).unwrap_or_default();
        if early.len() > dispatcher_ebpf::wire::TUNNEL_MAX_EARLY {
            // The last read may overshoot the limit the reads stop at; a
            // client that sent that much before the 101 loses the
            // connection rather than its bytes.
            tracing::info!(conn = self.cookie, early = early.len(), "upgraded after too many early bytes: closing");
            return Flow::Close;
        }
        // The worker writes into the socket from here on: the lease gate
        // must know it first.
        let known = to.pid() != 0 || !self.ctx.conn_state.gated();
        let fd = if known && self.gate_let(to.pid()) { self.sock.fd().and_then(super::socket::dup_fd) } else { None };
        if fd.is_some_and(|fd| to.tunnel(self.cookie, fd, early)) {
            tracing::debug!(conn = self.cookie, "upgraded: the connection is the worker's");
            self.handed_over = true;
        } else if !known {
            tracing::warn!(
                conn = self.cookie,
                "upgraded, but the lease gate does not know the worker (no hello): closing"
            );
        } else {
            tracing::warn!(conn = self.cookie, "upgraded, but the worker is gone: closing");
        }
        Flow::Close
    }

    /// The 101 is written: after what the app sent after it, the
    /// connection and the app's socket are joined in the kernel, watched
    /// by a splice task; this task forgets the connection.
    async fn splice_over(&mut self, to: crate::deliver::SpliceTo) -> Flow {
        let early = self.slow.as_mut().map(|s| s.parser.take_rest()).unwrap_or_default();
        if early.len() > dispatcher_ebpf::wire::TUNNEL_MAX_EARLY {
            tracing::info!(conn = self.cookie, early = early.len(), "upgraded after too many early bytes: closing");
            return Flow::Close;
        }
        let Some(splicer) = self.ctx.splice.clone() else {
            tracing::warn!(conn = self.cookie, "a worker sent a tunnel to splice, but splicing is off: closing");
            return Flow::Close;
        };
        if !to.early.is_empty() && !self.write(&to.early).await {
            return Flow::Close;
        }
        let Sock::Polled(stream) = std::mem::replace(&mut self.sock, Sock::Gone) else { return Flow::Close };
        let client = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(conn = self.cookie, "upgraded, but the socket could not leave the poller: {e}");
                return Flow::Close;
            }
        };
        self.handed_over = true;
        splicer.start(self.cookie, client, to.app, early, self.read, to.idle);
        Flow::Close
    }

    /// Writes all of `data` (the socket must not be leased). False when
    /// the connection is unusable.
    ///
    /// A client that reads too slowly is cut off (`false`): once the socket
    /// has refused bytes continuously for `body_timeout_secs`, the bytes it
    /// took since must average `min_body_rate` (HTTP.sys's `MinSendRate`),
    /// or any at all when that is 0. Before, a client reading 1 byte a
    /// second held its connection, and the answers queued for it, forever.
    pub(super) async fn write(&mut self, data: &[u8]) -> bool {
        self.unpark();
        let limit = Duration::from_secs(self.ctx.limits.body_timeout_secs);
        let min_rate = self.ctx.limits.min_body_rate;
        let Sock::Polled(s) = &mut self.sock else { return false };
        let mut off = 0;
        let mut refused = false;
        while off < data.len() {
            match s.try_write(&data[off..]) {
                Ok(n) => {
                    off += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    refused = true;
                    let (since, at) = *self.send_behind.get_or_insert((Instant::now(), self.written));
                    let waited = tokio::time::timeout(Duration::from_secs(1), s.writable()).await;
                    if matches!(waited, Ok(Err(_))) {
                        return false;
                    }
                    let age = since.elapsed();
                    let took = self.written - at;
                    let slow =
                        if min_rate == 0 { took == 0 } else { (took as f64) < min_rate as f64 * age.as_secs_f64() };
                    if age >= limit && slow {
                        tracing::debug!(conn = self.cookie, ?age, took, "the client reads too slowly; closing");
                        self.ctx.timeouts.count(super::Timeout::SendTooSlow);
                        // A reset, not a FIN behind megabytes the client
                        // would take hours to read: the kernel frees the
                        // socket's send queue now.
                        let _ = nix::sys::socket::setsockopt(
                            &*s,
                            nix::sys::socket::sockopt::Linger,
                            &libc::linger { l_onoff: 1, l_linger: 0 },
                        );
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        if !refused {
            // The client keeps up: the next refusal measures afresh.
            self.send_behind = None;
        }
        true
    }

    /// Queues a response the dispatcher makes itself.
    pub(super) async fn answer(
        &mut self,
        seq: u32,
        status: u16,
        why: &str,
        close: bool,
        retry_after: bool,
        head_only: bool,
    ) -> Flow {
        let mut data = local_response(status, why, close, retry_after);
        if head_only {
            let end = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(data.len(), |p| p + 4);
            data.truncate(end);
        }
        let data = Bytes::from(data);
        self.note_local(status, &data);
        self.ctx.counters.count_slow(None, 0, 1);
        self.on_frame(Frame::whole(seq, data, close)).await
    }

    /// Counts (metrics) and logs (access log) an answer of the
    /// dispatcher's own.
    pub(super) fn note_local(&mut self, status: u16, data: &[u8]) {
        self.ctx.local.count(status);
        if let Some(log) = &self.ctx.access_log {
            let body = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| data.len() - p - 4);
            log.local(self.ctx.conns.peer(self.cookie), &std::mem::take(&mut self.request_line), status, body);
        }
    }
}
