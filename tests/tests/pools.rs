//! Queues and workers: a full queue answers 503 instead of dropping, and a
//! worker that dies is restarted while its queue keeps the requests.

use std::time::{Duration, Instant};

use tests::{signal, Dispatcher, PoolDef};

/// Queue limit of the small pool, in bytes of queued records.
const SMALL_QUEUE: usize = 4096;
/// How long a killed worker may take to come back.
const RESTART_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn a_request_larger_than_the_queue_gets_503_with_retry_after() {
    let extra = format!("queue_bytes = {SMALL_QUEUE}");
    let def = PoolDef { extra: &extra, ..PoolDef::echo("small", &["*/"]) };
    let Some(d) = Dispatcher::start_if_privileged(&[def], "") else { return };
    let mut c = d.connect();
    let body = vec![b'x'; 2 * SMALL_QUEUE];
    c.send(format!("POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    c.send(&body);
    let r = c.read_response();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    // Not a silent drop, and the connection still serves what fits.
    assert_eq!(d.pool_stat("small", "queue_full"), 1, "{}", d.stats());
    c.get_from("x", "/small-enough", "small");
}

#[test]
fn a_dead_worker_is_restarted_and_its_queue_survives() {
    let Some(d) = Dispatcher::one_pool("") else { return };
    let mut c = d.connect();
    let pid = c.get("x", "/before").worker_pid();
    signal(pid, libc::SIGKILL);
    // Queued while no worker runs: the kernel keeps it on the ring, and
    // the next worker answers it.
    let t0 = Instant::now();
    let r = c.get("x", "/while-restarting");
    assert_eq!(r.status, 200);
    assert_ne!(r.worker_pid(), pid);
    assert!(t0.elapsed() < RESTART_TIMEOUT);
    assert!(d.log().contains("worker exited"), "{}", d.log());
}
