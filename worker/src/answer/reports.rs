//! What the worker reports to the dispatcher besides responses: its
//! access-log records, in batches, and its counters (responses by status
//! class, handling-time histogram), once a second when they moved.

use std::sync::{atomic::AtomicU64, Arc, Mutex};

use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::relay::frame;
use super::Outbound;
use crate::proto::{self, WorkerFrame};

/// How often the counters go to the dispatcher (when they moved).
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Access-log records are sent when this many bytes are waiting...
const LOG_BATCH: usize = 32 * 1024;
/// ...or this long after the first of them.
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

impl Outbound {
    /// Reports each answered request to the dispatcher's access log, in
    /// batches (one frame per [`LOG_BATCH`] bytes or [`LOG_FLUSH`]).
    pub(crate) fn enable_access_log(&self) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        if self.access_log.set(buf.clone()).is_ok() {
            let ctl = self.ctl.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LOG_FLUSH);
                loop {
                    tick.tick().await;
                    if !send_log(&ctl, &buf) {
                        return;
                    }
                }
            });
        }
    }

    /// Counts an answer (status class, handling time) for the metrics.
    pub(crate) fn count(&self, status: u16, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats_task.get_or_init(|| {
            let (ctl, stats) = (self.ctl.clone(), self.stats.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(STATS_EVERY);
                while !ctl.is_closed() {
                    tick.tick().await;
                    send_stats(&ctl, &stats);
                }
            });
        });
        let class = ((status / 100) as usize).clamp(1, 5) - 1;
        self.stats[class].fetch_add(1, Relaxed);
        let us = took.as_micros() as u64;
        let b = proto::LATENCY_BUCKETS_US.iter().position(|l| us <= *l).unwrap_or(proto::LATENCY_BUCKETS_US.len());
        self.stats[5 + b].fetch_add(1, Relaxed);
        self.stats[proto::STATS_WORDS - 1].fetch_add(us, Relaxed);
    }

    /// Adds request `req`'s access-log record (answered `status` with a
    /// body of `bytes`).
    pub(crate) fn log(&self, req: &crate::Request, status: u16, bytes: usize) {
        if self.access_log.get().is_none() {
            return;
        }
        let fields = [req.header("referer"), req.header("user-agent")];
        self.log_fields(req.conn, req.received, req.request_line(), fields, status, bytes);
    }

    /// The access-log record of a request known by its raw head (the
    /// `http` types' path: the head is looked at again only when the log
    /// is on).
    pub(crate) fn log_raw(&self, conn: u64, received: Instant, head: &[u8], status: u16, bytes: usize) {
        if self.access_log.get().is_none() {
            return;
        }
        let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let request_line = lines.next().unwrap_or_default();
        let mut fields = [None, None];
        for l in lines {
            let Some(colon) = l.iter().position(|&b| b == b':') else { continue };
            let (name, value) = (&l[..colon], l[colon + 1..].trim_ascii());
            for (i, want) in ["referer", "user-agent"].iter().enumerate() {
                if fields[i].is_none() && name.eq_ignore_ascii_case(want.as_bytes()) {
                    fields[i] = Some(value);
                }
            }
        }
        self.log_fields(conn, received, request_line, fields, status, bytes);
    }

    fn log_fields(
        &self,
        conn: u64,
        received: Instant,
        request_line: &[u8],
        fields: [Option<&[u8]>; 2],
        status: u16,
        bytes: usize,
    ) {
        let Some(buf) = self.access_log.get() else { return };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let mut b = buf.lock().unwrap();
        b.extend_from_slice(
            format!("{conn}\t{now}\t{status}\t{bytes}\t{}\t", received.elapsed().as_micros()).as_bytes(),
        );
        proto::log_field(&mut b, request_line);
        for f in fields {
            b.push(b'\t');
            match f {
                Some(v) => proto::log_field(&mut b, v),
                None => b.push(b'-'),
            }
        }
        b.push(b'\n');
        if b.len() >= LOG_BATCH {
            drop(b);
            send_log(&self.ctl, buf);
        }
    }

    /// Sends the counters and access-log records not sent yet.
    pub(super) fn flush_reports(&self) {
        send_stats(&self.ctl, &self.stats);
        if let Some(buf) = self.access_log.get() {
            send_log(&self.ctl, buf);
        }
    }
}

/// Sends the waiting access-log records as one frame; false once the
/// control socket is gone.
fn send_log(ctl: &mpsc::UnboundedSender<Bytes>, buf: &Mutex<Vec<u8>>) -> bool {
    let data = std::mem::take(&mut *buf.lock().unwrap());
    if data.is_empty() {
        return !ctl.is_closed();
    }
    ctl.send(frame(WorkerFrame::Log, &data)).is_ok()
}

/// Sends the counters that moved since the last frame.
fn send_stats(ctl: &mpsc::UnboundedSender<Bytes>, stats: &[AtomicU64; proto::STATS_WORDS]) {
    let words: Vec<u64> = stats.iter().map(|w| w.swap(0, std::sync::atomic::Ordering::Relaxed)).collect();
    if words.iter().all(|w| *w == 0) {
        return;
    }
    let data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let _ = ctl.send(frame(WorkerFrame::Stats, &data));
}
