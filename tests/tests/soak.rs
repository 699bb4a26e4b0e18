//! The soak (`tests::soak`) for `SOAK_SECS` (60 by default; `cargo xtask
//! soak --minutes N` runs it longer): every well-formed request gets its
//! own correct answer or a deliberate 502/503 while workers are killed,
//! recycled and reloaded, and the dispatcher's memory and descriptors come
//! back.

use std::time::Duration;

use tests::Dispatcher;

#[test]
fn mixed_load_with_workers_killed_recycled_and_reloaded() {
    let Some(d) = Dispatcher::start_if_privileged(&tests::soak::pools(), "") else { return };
    let secs = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let r = tests::soak::run(&d, Duration::from_secs(secs), |line| eprintln!("{line}"));
    eprintln!("[soak] done: {r:?}");
    if let Some(path) = std::env::var_os("SOAK_LOG") {
        let _ = std::fs::write(path, d.log());
    }
    assert!(r.wrong.is_empty(), "wrong answers: {:#?}", r.wrong);
    assert!(r.ok > 100 * secs, "only {} right answers in {secs} s", r.ok);
    assert!(r.refused > 0 && r.vanished > 0 && r.chaos > 0, "{r:?}");
    assert!(r.fds.1 <= r.fds.0 + 8, "descriptors {} → {}", r.fds.0, r.fds.1);
    assert!(r.rss_kib.1 <= r.rss_kib.0 + 48 * 1024, "RSS {} → {} KiB", r.rss_kib.0, r.rss_kib.1);
}
