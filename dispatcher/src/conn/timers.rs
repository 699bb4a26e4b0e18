//! A connection's time-outs: the response, header and keep-alive limits,
//! looked at once a second, and against the kernel's state only after
//! nothing moved for the shortest of them (idle connections cost nothing).

use std::time::{Duration, Instant};

use dispatcher_ebpf::abi::{MODE_BODY, MODE_HEAD};

use super::{Conn, Flow, RECHECK};
use crate::http::local_response;

impl Conn {
    /// Enforces the response, header and keep-alive time-outs. Runs every
    /// TICK but looks at the kernel's state only once nothing happened on
    /// the connection for the shortest of them, so idle connections cost
    /// nothing.
    pub(super) async fn check_timers(&mut self) -> Flow {
        let cfg = &self.ctx.limits;
        let idle = self.last_progress.elapsed();
        let header = Duration::from_secs(cfg.header_timeout_secs);
        if idle < header.min(Duration::from_secs(cfg.response_timeout_secs)) {
            return Flow::Continue;
        }
        if !self.lease.is_home() {
            if self.lease.overdue(Duration::from_secs(cfg.response_timeout_secs), Instant::now()) {
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
        if Instant::now() < self.next_check {
            return Flow::Continue;
        }
        self.next_check = Instant::now() + RECHECK.min(header);
        let (received, partial_head) = match &self.slow {
            Some(s) => (s.seq, !s.parser.is_idle() || s.body_left > 0),
            None => match self.ctx.conn_state.get(self.cookie) {
                Some(st) => {
                    // The kernel consumed bytes since the last look: the
                    // client is making progress.
                    let seen = (st.seq, st.head_len, st.body_left);
                    if seen != self.kernel_seen {
                        self.kernel_seen = seen;
                        self.last_progress = Instant::now();
                        return Flow::Continue;
                    }
                    (st.seq, st.mode == MODE_HEAD && st.head_len > 0 || st.mode == MODE_BODY)
                }
                None => (0, false),
            },
        };
        if received > self.next {
            if idle >= Duration::from_secs(cfg.response_timeout_secs) {
                tracing::warn!(conn = self.cookie, seq = self.next, "no response in time; answering 504");
                let r = local_response(504, "the worker did not answer in time", true, false);
                self.note_local(504, &r);
                self.write(&r).await;
                return Flow::Close;
            }
            return Flow::Continue;
        }
        if partial_head && idle >= header {
            tracing::debug!(conn = self.cookie, "request not received in time; answering 408");
            let r = local_response(408, "the request did not arrive in time", true, false);
            self.note_local(408, &r);
            self.write(&r).await;
            return Flow::Close;
        }
        if !partial_head && idle >= Duration::from_secs(cfg.keepalive_timeout_secs) {
            return Flow::Close;
        }
        Flow::Continue
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
