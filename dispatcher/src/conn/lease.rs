//! The connection's side of a lease: granting a worker the socket after
//! its first response, revoking it whenever anyone else must write (or a
//! time-out is due, or the client closes), taking it back on the worker's
//! release, and going on after the worker's death from its trace. Also
//! where the socket leaves tokio's poller while leased (see `parking`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dispatcher_ebpf::abi::MODE_SLOW;
use dispatcher_ebpf::wire::{LeaseMsg, NO_ENTRY};
use tokio::net::TcpStream;

use super::{socket::dup_fd, Conn, Flow, Sock};
use crate::{deliver::LeaseTx, tcp::socket_written};

/// Who writes on the connection: the states of its lease.
///
/// | state | event | next | what is sent |
/// |---|---|---|---|
/// | `Home` | a worker asks with a response, nothing else is due | `Out` | grant (with the socket) |
/// | `Home` | a worker asks, something else is due | `Home` | deny |
/// | `Out` | someone else has something to write, a time-out is due, the client closes | `Revoking` | revoke |
/// | `Revoking` | the same again | `Revoking` | nothing (asked once) |
/// | `Out`, `Revoking` | the holder's release of this generation | `Home` | nothing |
/// | `Out`, `Revoking` | the holder died (lease lost) | `Home` | nothing; its trace says where to go on |
/// | `Revoking` | no release within the response time-out | closed | nothing |
///
/// Generic over the holder so that the transitions are tested on the
/// host without a worker.
#[derive(Debug)]
pub(super) enum Lease<T> {
    /// The dispatcher writes; no lease is out.
    Home,
    /// Worker `to` holds lease `gen` and writes the responses.
    Out { gen: u32, to: T },
    /// Lease `gen` was asked back at `since`; `to` writes until its
    /// release arrives.
    Revoking { gen: u32, to: T, since: Instant },
}

impl<T> Lease<T> {
    pub(super) fn is_home(&self) -> bool {
        matches!(self, Lease::Home)
    }

    /// Lease `gen` is out (asked back or not).
    pub(super) fn holds(&self, gen: u32) -> bool {
        matches!(self, Lease::Out { gen: g, .. } | Lease::Revoking { gen: g, .. } if *g == gen)
    }

    /// Lease `gen` goes to `to`; only from `Home`.
    pub(super) fn grant(&mut self, gen: u32, to: T) {
        debug_assert!(self.is_home(), "a lease granted over another");
        *self = Lease::Out { gen, to };
    }

    /// Asks the lease back: the holder and generation to tell, the first
    /// time only.
    pub(super) fn revoke(&mut self, now: Instant) -> Option<(&T, u32)> {
        if let Lease::Out { .. } = self {
            let Lease::Out { gen, to } = std::mem::replace(self, Lease::Home) else { unreachable!() };
            *self = Lease::Revoking { gen, to, since: now };
            if let Lease::Revoking { gen, to, .. } = self {
                return Some((to, *gen));
            }
        }
        None
    }

    /// Lease `gen` ended (released or lost): home again; its holder.
    pub(super) fn end(&mut self, gen: u32) -> Option<T> {
        if !self.holds(gen) {
            return None;
        }
        self.take()
    }

    /// Ends whatever lease is out (the connection closes): its holder.
    pub(super) fn take(&mut self) -> Option<T> {
        match std::mem::replace(self, Lease::Home) {
            Lease::Home => None,
            Lease::Out { to, .. } | Lease::Revoking { to, .. } => Some(to),
        }
    }

    /// Asked back at least `limit` before `now` and not given back.
    pub(super) fn overdue(&self, limit: Duration, now: Instant) -> bool {
        matches!(self, Lease::Revoking { since, .. } if now.duration_since(*since) >= limit)
    }
}

impl Conn {
    /// The worker gave lease `gen` back, having written everything before
    /// `seq`.
    pub(super) async fn on_release(&mut self, gen: u32, seq: u32) -> Flow {
        let Some(to) = self.lease.end(gen) else {
            tracing::debug!(conn = self.cookie, gen, seq, "stale release");
            return Flow::Continue;
        };
        tracing::debug!(conn = self.cookie, gen, seq, "lease released");
        to.settled(self.cookie);
        self.gate_home();
        self.unpark();
        // The worker's writes count as written from here on (a later
        // holder's death is judged against this).
        if let Sock::Polled(stream) = &self.sock {
            if let Ok(n) = socket_written(std::os::fd::AsRawFd::as_raw_fd(stream)) {
                self.written = n;
            }
        }
        if seq > self.next {
            // Slow-path requests are never answered under a lease, so
            // nothing in `sent` is settled by this; drop stale frames.
            self.next = seq;
            self.pending = self.pending.split_off(&seq);
        }
        self.flush().await
    }

    /// The worker holding the lease died without giving it back. Its
    /// trace (`worker::progress`) says how far it wrote; if the socket took
    /// exactly that, the stream stopped between two responses: the
    /// connection goes on, and the requests the worker had taken and not
    /// answered get 502. Otherwise part of a response is out, and the
    /// connection has to close.
    pub(super) async fn lease_lost(&mut self, gen: u32, entry: u32) -> Flow {
        let Some(to) = self.lease.end(gen) else { return Flow::Continue };
        to.settled(self.cookie);
        self.gate_home();
        let t = to.trace(self.cookie, entry).unwrap_or(worker::progress::Trace {
            next: self.next,
            taken: self.next,
            complete_bytes: 0,
            pending: 0,
            in_flight: 0,
        });
        self.unpark();
        let Sock::Polled(stream) = &self.sock else { return Flow::Close };
        let n = match socket_written(std::os::fd::AsRawFd::as_raw_fd(stream)) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(conn = self.cookie, "the worker holding the connection died; closing it ({e})");
                return Flow::Close;
            }
        };
        // Between two responses: before the one it was writing, or (killed
        // before it could note it) just after it.
        let next = if n == self.written + t.complete_bytes {
            t.next
        } else if t.pending > 0 && n == self.written + t.complete_bytes + t.pending as u64 {
            t.next.wrapping_add(1)
        } else {
            tracing::warn!(
                conn = self.cookie,
                "the worker holding the connection died in the middle of a response; closing it"
            );
            return Flow::Close;
        };
        let taken = t.taken.max(next);
        self.written = n;
        if next > self.next {
            self.next = next;
            self.pending = self.pending.split_off(&next);
        }
        tracing::warn!(
            conn = self.cookie,
            next,
            taken,
            "the worker holding the connection died; going on from its last response"
        );
        for seq in next..taken {
            let in_flight = taken - seq <= 64 && t.in_flight & (1u64 << (seq % 64)) != 0;
            if !in_flight || self.pending.get(&seq).is_some_and(|f| !f.is_empty()) {
                continue;
            }
            if let Flow::Close =
                self.answer(seq, 502, "the worker died while handling this request", false, false, false).await
            {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// A worker died with requests of this connection taken and not
    /// answered (it held no lease on it; see `worker::progress::Loose`):
    /// each gets 502, unless its whole response arrived after all.
    pub(super) async fn requests_lost(&mut self, taken: u32, in_flight: u64) -> Flow {
        let seqs: Vec<u32> = (1..=64u32.min(taken))
            .rev()
            .map(|back| taken - back)
            .filter(|seq| in_flight & (1u64 << (seq % 64)) != 0)
            .collect();
        self.answer_lost(&seqs).await
    }

    /// Control channel `gen` of pool `pool`'s slot `slot` ended: the
    /// slow-path requests sent over it that are not answered get 502 (the
    /// worker may have died before reading them; nothing will answer). A
    /// body still arriving for one of them is read and dropped.
    pub(super) async fn channel_gone(&mut self, pool: usize, slot: usize, gen: u64) -> Flow {
        let mut seqs: Vec<u32> = self
            .sent
            .iter()
            .filter(|(_, s)| Arc::as_ptr(&s.link) as usize == pool && s.slot == slot && s.gen == gen)
            .map(|(&seq, _)| seq)
            .collect();
        if seqs.is_empty() {
            return Flow::Continue;
        }
        seqs.sort_unstable();
        for &seq in &seqs {
            if let Some(s) = self.sent.get(&seq) {
                s.link.forget_request(slot, self.cookie, seq);
            }
        }
        if let Some(s) = self.slow.as_mut() {
            s.body_lost(pool, slot, &seqs);
        }
        tracing::warn!(conn = self.cookie, slot, ?seqs, "the worker's channel ended with these requests unanswered");
        self.answer_lost(&seqs).await
    }

    /// Answers 502 to each of `seqs` (ascending) that a dead worker took
    /// or was sent and did not answer, unless its whole response arrived
    /// after all; closes if only part of one did.
    async fn answer_lost(&mut self, seqs: &[u32]) -> Flow {
        for &seq in seqs {
            if seq < self.next {
                continue;
            }
            match self.pending.get(&seq) {
                Some(f) if f.iter().any(|f| f.last) => continue,
                // Part of its response is already in the socket: nothing
                // can follow it.
                Some(f) if f.is_empty() || (seq == self.next && self.lease.is_home()) => {
                    tracing::warn!(
                        conn = self.cookie,
                        seq,
                        "the worker died in the middle of a response; closing the connection"
                    );
                    return Flow::Close;
                }
                Some(_) => {
                    self.pending.remove(&seq);
                }
                None => {}
            }
            tracing::warn!(conn = self.cookie, seq, "the worker died while handling this request; answering 502");
            if let Flow::Close =
                self.answer(seq, 502, "the worker died while handling this request", false, false, false).await
            {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Asks the lease holder, if any, to give the connection back.
    pub(super) fn revoke(&mut self) {
        if let Some((to, gen)) = self.lease.revoke(Instant::now()) {
            tracing::debug!(conn = self.cookie, gen, "revoking the lease");
            to.send(LeaseMsg::Revoke { conn: self.cookie, gen }, None);
        }
    }

    /// Answers a worker's request for a lease, made with the response just
    /// written: granted when the connection has nothing else to write and
    /// nobody else is expected to write on it.
    pub(super) fn answer_ask(&mut self, to: Arc<LeaseTx>) {
        // Not while the socket has something for user space: a hand-off
        // (its wake-up may already be spent on revoking a lease that this
        // grant would replace) or the peer's close.
        // The worker's process must be known (its hello) for the lease
        // gate to let it write.
        let grant = self.ctx.limits.direct_responses
            && (to.pid() != 0 || !self.ctx.conn_state.gated())
            && self.lease.is_home()
            && self.slow.is_none()
            && self.pending.is_empty()
            && !self.eof
            && !self.woken
            && self.ctx.conn_state.get(self.cookie).is_none_or(|st| st.mode != MODE_SLOW);
        let fd = if grant && self.gate_let(to.pid()) { self.sock.fd().and_then(dup_fd) } else { None };
        let Some(fd) = fd else {
            if grant {
                self.gate_home();
            }
            to.send(LeaseMsg::Deny { conn: self.cookie, from: self.next }, None);
            return;
        };
        self.lease_gen = self.lease_gen.wrapping_add(1);
        let msg = LeaseMsg::Grant { conn: self.cookie, from: self.next, gen: self.lease_gen, entry: NO_ENTRY };
        if to.send(msg, Some(fd)) {
            tracing::debug!(conn = self.cookie, gen = self.lease_gen, from = self.next, "lease granted");
            self.lease.grant(self.lease_gen, to);
            self.park();
        } else {
            self.gate_home();
        }
    }

    /// Lets process `pid` (besides the dispatcher) write into the socket:
    /// before its lease or tunnel goes out. False if the lease gate could
    /// not be told (then nothing goes out).
    pub(super) fn gate_let(&self, pid: u32) -> bool {
        self.sock.fd().is_some_and(|fd| self.ctx.conn_state.let_write(fd, self.cookie, pid))
    }

    /// Only the dispatcher may write into the socket again: the lease came
    /// back or was lost.
    pub(super) fn gate_home(&self) {
        if self.ctx.conn_state.gated() {
            self.gate_let(0);
        }
    }

    /// Takes the socket out of tokio's poller while a worker writes to it.
    pub(super) fn park(&mut self) {
        let Sock::Polled(_) = self.sock else { return };
        let Sock::Polled(s) = std::mem::replace(&mut self.sock, Sock::Gone) else { unreachable!() };
        match s.into_std() {
            Ok(std) => match self.ctx.parking.park(&std, self.cookie) {
                Ok(()) => self.sock = Sock::Parked(std),
                Err(e) => {
                    tracing::warn!(conn = self.cookie, "parking a connection: {e}");
                    self.sock = TcpStream::from_std(std).map_or(Sock::Gone, Sock::Polled);
                }
            },
            Err(e) => tracing::warn!(conn = self.cookie, "taking a connection out of the poller: {e}"),
        }
    }

    /// Puts a parked socket back into tokio's poller.
    pub(super) fn unpark(&mut self) {
        let Sock::Parked(_) = self.sock else { return };
        let Sock::Parked(std) = std::mem::replace(&mut self.sock, Sock::Gone) else { unreachable!() };
        self.ctx.parking.unpark(&std);
        match TcpStream::from_std(std) {
            Ok(s) => self.sock = Sock::Polled(s),
            Err(e) => tracing::warn!(conn = self.cookie, "putting a connection back in the poller: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn granted_then_revoked_once_then_released() {
        let t0 = Instant::now();
        let mut l = Lease::Home;
        assert!(l.revoke(t0).is_none(), "nothing to revoke at home");
        l.grant(1, 'w');
        assert!(l.holds(1) && !l.holds(2) && !l.is_home());
        assert_eq!(l.revoke(t0), Some((&'w', 1)));
        assert_eq!(l.revoke(t0), None, "asked once");
        assert!(l.holds(1), "still out while revoking");
        assert_eq!(l.end(2), None, "a stale release ends nothing");
        assert!(l.holds(1));
        assert_eq!(l.end(1), Some('w'));
        assert!(l.is_home());
    }

    #[test]
    fn a_lease_lost_while_out_comes_home() {
        let mut l = Lease::Home;
        l.grant(7, 'w');
        assert_eq!(l.end(7), Some('w'));
        assert!(l.is_home() && l.end(7).is_none());
    }

    #[test]
    fn overdue_only_after_a_revoke_and_the_limit() {
        let t0 = Instant::now();
        let mut l = Lease::Home;
        l.grant(1, ());
        assert!(!l.overdue(LIMIT, t0 + LIMIT * 2), "never asked back");
        l.revoke(t0);
        assert!(!l.overdue(LIMIT, t0 + LIMIT / 2));
        assert!(l.overdue(LIMIT, t0 + LIMIT));
    }

    #[test]
    fn closing_takes_whatever_is_out() {
        let mut l = Lease::Home;
        assert_eq!(l.take(), None::<char>);
        l.grant(3, 'w');
        l.revoke(Instant::now());
        assert_eq!(l.take(), Some('w'));
        assert!(l.is_home());
    }
}
