//! The metrics endpoint: `GET /metrics` in the Prometheus text format on
//! the admin address (`[admin] metrics`), for a scraper on the host.
//!
//! Per pool: requests by path (kernel / slow path), queue-full
//! rejections, queue depth per slot, workers running, started and crashed,
//! responses by status class and the workers' handling-time histogram
//! (both reported by the workers in `WorkerFrame::Stats`, see `dispatcher_ebpf::wire`). Also:
//! the dispatcher's own answers by status class, hand-offs to the slow
//! path by reason, the XDP guard's packets by verdict, open connections.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Context;

/// Largest request head the endpoint reads.
const MAX_HEAD: usize = 8192;

/// Serves the endpoint on `addr` until the process exits.
pub async fn listen(addr: SocketAddr, ctx: Arc<Context>) -> Result<()> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (field `admin.metrics`)"))?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_HEAD];
                let mut n = 0;
                let status = loop {
                    let Ok(Ok(k)) =
                        tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf[n..])).await
                    else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    n += k;
                    let mut h = [httparse::EMPTY_HEADER; 32];
                    let mut req = httparse::Request::new(&mut h);
                    match req.parse(&buf[..n]) {
                        Ok(httparse::Status::Complete(_)) => {
                            break match (req.method, req.path) {
                                (Some("GET"), Some("/metrics")) => 200,
                                _ => 404,
                            };
                        }
                        Ok(httparse::Status::Partial) if n < buf.len() => continue,
                        _ => break 400,
                    }
                };
                let body = if status == 200 { render(&ctx) } else { "only GET /metrics is served here\n".into() };
                let date = worker::date::http_date();
                let head = format!(
                    "HTTP/1.1 {status} {}\r\nDate: {}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    match status {
                        200 => "OK",
                        404 => "Not Found",
                        _ => "Bad Request",
                    },
                    std::str::from_utf8(&date).unwrap_or_default(),
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(ctx: &Context) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let links: Vec<_> = ctx.pools.all().into_iter().filter(|l| !l.retiring.load(Relaxed)).collect();
    let counts: Vec<(u64, u64, u64)> = links.iter().map(|l| ctx.counters.pool_requests(l.index)).collect();

    help(&mut out, "dispatcher_requests_total", "counter", "Requests routed to a pool, by the path that framed them.");
    for (l, (fast, slow, _)) in links.iter().zip(&counts) {
        let _ = writeln!(out, "dispatcher_requests_total{{pool=\"{}\",path=\"kernel\"}} {fast}", l.name);
        let _ = writeln!(out, "dispatcher_requests_total{{pool=\"{}\",path=\"slow\"}} {slow}", l.name);
    }
    help(
        &mut out,
        "dispatcher_queue_full_total",
        "counter",
        "Requests the kernel found their pool's queue full for (answered 503).",
    );
    for (l, (_, _, full)) in links.iter().zip(&counts) {
        let _ = writeln!(out, "dispatcher_queue_full_total{{pool=\"{}\"}} {full}", l.name);
    }
    help(&mut out, "dispatcher_queue_bytes", "gauge", "Bytes queued on a worker slot's ring, not consumed yet.");
    let k = ctx.pools.rings();
    for l in &links {
        for i in 0..l.slots.len() {
            let _ = writeln!(
                out,
                "dispatcher_queue_bytes{{pool=\"{}\",slot=\"{i}\"}} {}",
                l.name,
                k.queued_bytes(l.first_ring + i)
            );
        }
    }
    drop(k);
    help(&mut out, "dispatcher_workers", "gauge", "Worker processes running.");
    for l in &links {
        let n = l.slots.iter().filter(|s| s.worker.lock().unwrap().is_some()).count();
        let _ = writeln!(out, "dispatcher_workers{{pool=\"{}\"}} {n}", l.name);
    }
    type Count = fn(&crate::pool::SlotLink) -> &std::sync::atomic::AtomicU64;
    let per_slot: [(&str, &str, Count); 2] = [
        ("dispatcher_worker_starts_total", "Worker processes started (restarts and recycles included).", |s| &s.starts),
        ("dispatcher_worker_crashes_total", "Worker processes that exited uncleanly or were killed.", |s| &s.crashes),
    ];
    for (name, what, count) in per_slot {
        help(&mut out, name, "counter", what);
        for l in &links {
            let n: u64 = l.slots.iter().map(|s| count(s).load(Relaxed)).sum();
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {n}", l.name);
        }
    }
    help(
        &mut out,
        "dispatcher_responses_total",
        "counter",
        "Responses by the pool's workers, by status class (reported every second).",
    );
    let stats: Vec<_> = links.iter().map(|l| *l.worker_stats.lock().unwrap()).collect();
    for (l, s) in links.iter().zip(&stats) {
        for (c, name) in CLASSES.iter().enumerate() {
            let _ = writeln!(out, "dispatcher_responses_total{{pool=\"{}\",class=\"{name}\"}} {}", l.name, s[c]);
        }
    }
    help(&mut out, "dispatcher_handling_seconds", "histogram", "Time from a worker taking a request to its answer.");
    for (l, s) in links.iter().zip(&stats) {
        let buckets = &s[5..5 + dispatcher_ebpf::wire::LATENCY_BUCKETS_US.len() + 1];
        let mut cum = 0;
        for (i, le) in dispatcher_ebpf::wire::LATENCY_BUCKETS_US.iter().enumerate() {
            cum += buckets[i];
            let _ = writeln!(
                out,
                "dispatcher_handling_seconds_bucket{{pool=\"{}\",le=\"{}\"}} {cum}",
                l.name,
                *le as f64 / 1e6
            );
        }
        cum += buckets[dispatcher_ebpf::wire::LATENCY_BUCKETS_US.len()];
        let _ = writeln!(out, "dispatcher_handling_seconds_bucket{{pool=\"{}\",le=\"+Inf\"}} {cum}", l.name);
        let _ = writeln!(
            out,
            "dispatcher_handling_seconds_sum{{pool=\"{}\"}} {}",
            l.name,
            s[dispatcher_ebpf::wire::STATS_WORDS - 1] as f64 / 1e6
        );
        let _ = writeln!(out, "dispatcher_handling_seconds_count{{pool=\"{}\"}} {cum}", l.name);
    }
    help(
        &mut out,
        "dispatcher_local_responses_total",
        "counter",
        "Answers the dispatcher wrote itself (errors, 503s, 502s), by status class.",
    );
    for (c, name) in CLASSES.iter().enumerate() {
        let _ = writeln!(out, "dispatcher_local_responses_total{{class=\"{name}\"}} {}", ctx.local.get(c + 1));
    }
    help(&mut out, "dispatcher_timeouts_total", "counter", "Connections ended by a time-out, by which one.");
    for (t, name) in crate::conn::Timeout::ALL {
        let _ = writeln!(out, "dispatcher_timeouts_total{{kind=\"{name}\"}} {}", ctx.timeouts.get(t));
    }
    if let Ok(stats) = crate::bpf::read_stats(&ctx.instance, Some(1)) {
        help(
            &mut out,
            "dispatcher_handoffs_total",
            "counter",
            "Connections the kernel handed to the slow path, by reason.",
        );
        for (r, n) in &stats.handoffs {
            let _ = writeln!(out, "dispatcher_handoffs_total{{reason=\"{r}\"}} {n}");
        }
        help(
            &mut out,
            "dispatcher_retransmitted_overlaps_total",
            "counter",
            "Retransmitted segments that overlapped bytes already received, by what the kernel did with the old bytes.",
        );
        for (w, n) in &stats.retransmits {
            let _ = writeln!(out, "dispatcher_retransmitted_overlaps_total{{what=\"{w}\"}} {n}");
        }
        help(
            &mut out,
            "dispatcher_lease_gate_refused_total",
            "counter",
            "Writes into a client socket the lease gate refused (neither the dispatcher nor the lease holder), and their bytes.",
        );
        if let (Some(w), Some(b)) = (stats.lease_gate.get("refused"), stats.lease_gate.get("refused_bytes")) {
            let _ = writeln!(out, "dispatcher_lease_gate_refused_total{{what=\"writes\"}} {w}");
            let _ = writeln!(out, "dispatcher_lease_gate_refused_total{{what=\"bytes\"}} {b}");
        }
        help(
            &mut out,
            "dispatcher_tunnel_bytes_total",
            "counter",
            "Bytes of spliced tunnels (after a 101), moved by the kernel's redirect or by the dispatcher.",
        );
        {
            for (k, how) in [("redirected_bytes", "kernel"), ("passed_bytes", "dispatcher")] {
                if let Some(v) = stats.tunnels.get(k) {
                    let _ = writeln!(out, "dispatcher_tunnel_bytes_total{{by=\"{how}\"}} {v}");
                }
            }
        }
        help(&mut out, "dispatcher_guard_packets_total", "counter", "Packets the XDP guard judged, by verdict.");
        for (v, n) in &stats.guard {
            let _ = writeln!(out, "dispatcher_guard_packets_total{{verdict=\"{v}\"}} {n}");
        }
    }
    help(&mut out, "dispatcher_connections", "gauge", "Client connections open.");
    let _ = writeln!(out, "dispatcher_connections {}", ctx.conns.len());
    out
}
