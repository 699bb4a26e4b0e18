//! The ring wake-up protocol: while a worker drains its ring, the kernel
//! queues requests without waking it; before sleeping the worker clears its
//! awake flag and looks once more. A lost wake-up would leave a request
//! sitting on the ring, which these tests would see as a read time-out.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tests::{join_all, on_connections, Dispatcher};

/// Client threads, each on its own keep-alive connection.
const CLIENTS: usize = 4;
/// Requests per client, one at a time (each waits for its answer), so the
/// worker keeps going to sleep and being woken.
const REQUESTS: usize = 1500;
/// Every this many requests, a client pauses briefly (long enough for the
/// worker to clear its flag, short enough to race with it).
const PAUSE_EVERY: usize = 7;
const PAUSE: Duration = Duration::from_micros(30);
/// How long the idle worker may take to clear its flag.
const SETTLE: Duration = Duration::from_secs(5);

#[test]
fn requests_racing_the_worker_falling_asleep_are_all_answered() {
    let Some(d) = Dispatcher::one_pool("") else { return };
    let threads = on_connections(&d, CLIENTS, |t, mut c| {
        for i in 0..REQUESTS {
            // Panics on a read time-out: a request nobody woke up for.
            c.get_echoed(&format!("/t{t}/{i}"));
            if i % PAUSE_EVERY == 0 {
                std::thread::sleep(PAUSE);
            }
        }
    });
    join_all(threads, "a client thread failed");
    assert_eq!(d.pool_stat("p", "fast_requests"), (CLIENTS * REQUESTS) as u64, "{}", d.stats());
}

#[test]
fn an_idle_worker_clears_its_awake_flag() {
    let Some(d) = Dispatcher::one_pool("") else { return };
    let mut c = d.connect();
    for i in 0..50 {
        assert_eq!(c.get("x", &format!("/{i}")).status, 200);
    }
    let pin = d.pin_dir().join("awake_p");
    let t0 = Instant::now();
    loop {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&pin)
            .arg("-j")
            .output()
            .expect("running bpftool");
        assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        // An array of one entry; its value is the flag (BTF-formatted or raw bytes).
        let value = &v[0]["value"];
        let asleep = value.as_u64() == Some(0)
            || value.as_array().is_some_and(|b| {
                b.iter().all(|x| x.as_str().is_some_and(|s| s.trim_start_matches("0x").chars().all(|c| c == '0')))
            });
        if asleep {
            return;
        }
        assert!(t0.elapsed() < SETTLE, "the idle worker's flag is still set: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
