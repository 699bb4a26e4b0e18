//! A connection's time-outs, looked at once a second, and against the
//! kernel's state only after nothing moved for the shortest of them (idle
//! connections cost nothing):
//!
//! - **header**: a head not complete `header_timeout_secs` after its first
//!   byte gets 408 (a drip-fed head is cut at the limit: the kernel stamps
//!   a head's start in `ConnState::since_ns`, the slow path when it
//!   buffers its first byte); a connection that sends nothing at all is
//!   closed after the same time;
//! - **body**: no body bytes for `body_timeout_secs`, or after that long an
//!   average under `min_body_rate`, gets 408;
//! - **response**: the oldest request unanswered after
//!   `response_timeout_secs` gets 504;
//! - **keep-alive**: an idle connection between requests is closed after
//!   `keepalive_timeout_secs`.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use dispatcher_ebpf::abi::{MODE_BODY, MODE_HEAD};

use super::{Conn, Flow, RECHECK};
use crate::http::{local_response, Event};

/// Which time-out ended a connection.
#[derive(Clone, Copy, Debug)]
pub enum Timeout {
    /// A head that did not arrive in time (408).
    Header,
    /// A connection that sent nothing at all (closed).
    Silent,
    /// A body whose next bytes did not come in time (408).
    BodyStalled,
    /// A body arriving slower than `min_body_rate` (408).
    BodyTooSlow,
    /// A response that did not come in time (504).
    Response,
    /// An idle keep-alive connection (closed).
    KeepAlive,
    /// A client reading its answers slower than `min_body_rate` (closed).
    SendTooSlow,
}

impl Timeout {
    /// Every kind, in counter order, with its metrics label.
    pub const ALL: [(Timeout, &'static str); 7] = [
        (Timeout::Header, "header"),
        (Timeout::Silent, "silent"),
        (Timeout::BodyStalled, "body_stalled"),
        (Timeout::BodyTooSlow, "body_too_slow"),
        (Timeout::Response, "response"),
        (Timeout::KeepAlive, "keepalive"),
        (Timeout::SendTooSlow, "send_too_slow"),
    ];
}

/// Connections the time-outs ended, by kind.
#[derive(Default)]
pub struct Timeouts([AtomicU64; 7]);

impl Timeouts {
    pub(super) fn count(&self, t: Timeout) {
        self.0[t as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, t: Timeout) -> u64 {
        self.0[t as usize].load(Ordering::Relaxed)
    }
}

/// Where the request being received is.
enum Phase {
    /// Between requests: nothing of the next one has arrived.
    Between,
    /// Its head began this long ago.
    Head(Duration),
    /// Its body began this long ago and `got` bytes of it have arrived.
    Body { age: Duration, got: u64 },
}

/// CLOCK_MONOTONIC now, in the nanoseconds `bpf_ktime_get_ns` counts.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a timespec on the stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Conn {
    /// Enforces the time-outs. Runs every TICK but looks at the kernel's
    /// state only once nothing happened on the connection for the shortest
    /// of them, so idle connections cost nothing.
    pub(super) async fn check_timers(&mut self) -> Flow {
        let cfg = &self.ctx.limits;
        let header = Duration::from_secs(cfg.header_timeout_secs);
        let response = Duration::from_secs(cfg.response_timeout_secs);
        let body = Duration::from_secs(cfg.body_timeout_secs);
        let keepalive = Duration::from_secs(cfg.keepalive_timeout_secs);
        let min_rate = cfg.min_body_rate;
        let idle = self.last_progress.elapsed();
        // The slow path's own clocks cost nothing to read: a head or body
        // in progress there is looked at every tick (its reads keep
        // `last_progress` fresh, so a drip-fed head would never get past
        // the gate below).
        let slow_busy = self.slow.as_ref().is_some_and(|s| s.head_since.is_some() || s.body_since.is_some());
        if !slow_busy && idle < header.min(response).min(body) {
            return Flow::Continue;
        }
        if !self.lease.is_home() {
            if self.lease.overdue(response, Instant::now()) {
                // A worker that neither answers nor gives the connection
                // back: nothing can be written on it in order any more.
                tracing::warn!(
                    conn = self.cookie,
                    "the lease holder did not give the connection back in time; closing it"
                );
                return Flow::Close;
            }
            // The worker's writes are not seen here: ask where it is
            // before judging the connection idle or late.
            self.revoke();
            return Flow::Continue;
        }
        if !slow_busy && Instant::now() < self.next_check {
            return Flow::Continue;
        }
        self.next_check = Instant::now() + RECHECK.min(header).min(body);
        let mut idle = idle;
        let (received, phase) = match &mut self.slow {
            Some(s) => {
                if !s.may_read() {
                    // Not reading (the application has not taken what it
                    // was sent): the client is not the slow one.
                    if s.body_since.is_some() {
                        s.body_since = Some(Instant::now());
                        s.body_got = 0;
                    }
                    idle = Duration::ZERO;
                }
                let phase = if let Some(t) = s.head_since {
                    Phase::Head(t.elapsed())
                } else if let Some(t) = s.body_since {
                    Phase::Body { age: t.elapsed(), got: s.body_got }
                } else {
                    Phase::Between
                };
                // A request whose body is arriving is the client's to
                // finish, not the worker's to answer yet.
                (s.seq - s.body_in_progress() as u32, phase)
            }
            None => match self.ctx.conn_state.get(self.cookie) {
                Some(st) => {
                    // Requests or body bytes arrived since the last look:
                    // the client is making progress. (Head bytes are not:
                    // a head has its whole time-out from its first byte.)
                    let seen = (st.seq, st.body_left);
                    if seen != self.kernel_seen {
                        self.kernel_seen = seen;
                        self.last_progress = Instant::now();
                        idle = Duration::ZERO;
                    }
                    let age = Duration::from_nanos(monotonic_ns().saturating_sub(st.since_ns));
                    let phase = if st.mode == MODE_HEAD && st.head_len > 0 {
                        Phase::Head(age)
                    } else if st.mode == MODE_BODY {
                        Phase::Body { age, got: st.scan.content_length.saturating_sub(st.body_left) }
                    } else {
                        Phase::Between
                    };
                    (st.seq, phase)
                }
                None => (0, Phase::Between),
            },
        };
        if received > self.next {
            if idle >= response {
                tracing::warn!(conn = self.cookie, seq = self.next, "no response in time; answering 504");
                return self.time_out(Timeout::Response, 504, "the worker did not answer in time").await;
            }
            return Flow::Continue;
        }
        match phase {
            Phase::Head(age) if age >= header => {
                tracing::debug!(conn = self.cookie, ?age, "request head not received in time; answering 408");
                self.time_out(Timeout::Header, 408, "the request head did not arrive in time").await
            }
            Phase::Body { .. } if idle >= body => {
                tracing::debug!(conn = self.cookie, ?idle, "request body stalled; answering 408");
                self.time_out(Timeout::BodyStalled, 408, "the request body stopped arriving").await
            }
            Phase::Body { age, got }
                if min_rate > 0 && age >= body && (got as f64) < min_rate as f64 * age.as_secs_f64() =>
            {
                tracing::debug!(conn = self.cookie, ?age, got, "request body too slow; answering 408");
                self.time_out(Timeout::BodyTooSlow, 408, "the request body arrived too slowly").await
            }
            Phase::Between if received == 0 && self.written == 0 && idle >= header => {
                // Connected and never sent a byte (nginx: client_header_timeout
                // for the first request, keep-alive only after one).
                self.ctx.timeouts.count(Timeout::Silent);
                Flow::Close
            }
            Phase::Between if idle >= keepalive => {
                self.ctx.timeouts.count(Timeout::KeepAlive);
                Flow::Close
            }
            _ => Flow::Continue,
        }
    }

    /// Ends the connection with the dispatcher's own `status` answer for the
    /// request being received (or the oldest unanswered one, for a 504).
    async fn time_out(&mut self, kind: Timeout, status: u16, why: &'static str) -> Flow {
        self.ctx.timeouts.count(kind);
        if self.slow.is_some() && status == 408 {
            // The slow path's error answer: a body's worker is told to drop
            // the request, and the answer takes the request's place.
            return self.on_event(Event::Error { status, why }).await;
        }
        let r = local_response(status, why, true, false);
        self.note_local(status, &r);
        self.write(&r).await;
        Flow::Close
    }

    /// Requests received (by the kernel or the slow path) and not yet
    /// answered.
    pub(super) fn outstanding(&self) -> u32 {
        let received = match &self.slow {
            Some(s) => s.seq,
            None => self.ctx.conn_state.get(self.cookie).map_or(0, |st| st.seq),
        };
        received.saturating_sub(self.next)
    }
}
