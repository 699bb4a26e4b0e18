//! The XDP guard on a veth interface, between network namespaces this
//! test creates: deny and allow lists (from the configuration and changed
//! live from the CLI), per-source SYN rate limits, counters, and a clean
//! interface after exit.

use std::time::{Duration, Instant};

use tests::{privileged, Dispatcher, Netns, PoolDef};

/// A connection attempt the guard drops fails within this.
const DROPPED: Duration = Duration::from_millis(700);
/// A served request's connect time-out (generous: the machine is shared).
const SERVED: Duration = Duration::from_secs(5);

/// Starts a dispatcher in `ns`'s server namespace, listening on all its
/// addresses, guarded on its veth; returns it and its port.
fn start(ns: &Netns, extra: &str) -> (Dispatcher, u16) {
    let port = tests::free_port();
    let listen = format!("0.0.0.0:{port}");
    let d = Dispatcher::start_with(&[PoolDef::echo("p", &["*/"])], extra, Some(&ns.srv), &["--listen", &listen, "--iface", &ns.veth]);
    (d, port)
}

fn counter(d: &Dispatcher, name: &str) -> u64 {
    let (ok, out) = d.cli(&["guard", "show"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}: {out}"))
}

#[test]
fn a_denied_source_gets_no_connection_and_an_allowed_one_is_served() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let [good, bad] = ns.clients;
    let (d, port) = start(&ns, &format!("[guard]\ndeny = [\"{bad}/32\"]"));
    // veth has native XDP: driver mode, said in the log.
    assert!(d.log().contains("XDP guard attached") && d.log().contains("mode=\"driver\""), "{}", d.log());
    assert_eq!(ns.curl(good, port, "/ok", SERVED), 200);
    let before = counter(&d, "denied");
    assert_eq!(ns.curl(bad, port, "/no", DROPPED), 0, "a denied source was served");
    assert!(counter(&d, "denied") > before, "the deny counter did not move");
    assert!(counter(&d, "allowed") > 0);
    // Other traffic passes untouched: the denied source still reaches
    // another port (a refused connection, not a dropped one).
    let t0 = Instant::now();
    assert_eq!(ns.curl(bad, port + 1, "/", SERVED), 0);
    assert!(t0.elapsed() < DROPPED, "a packet to another port was dropped");
}

#[test]
fn lists_changed_from_the_cli_apply_without_a_restart() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let [a, b] = ns.clients;
    let (d, port) = start(&ns, "");
    assert_eq!(ns.curl(a, port, "/", SERVED), 200);

    let (ok, out) = d.cli(&["guard", "deny", "add", &a.to_string()]);
    assert!(ok, "{out}");
    assert_eq!(ns.curl(a, port, "/", DROPPED), 0, "deny add did not take effect");
    assert_eq!(ns.curl(b, port, "/", SERVED), 200);
    let (ok, out) = d.cli(&["guard", "deny", "del", &a.to_string()]);
    assert!(ok, "{out}");
    assert_eq!(ns.curl(a, port, "/", SERVED), 200, "deny del did not take effect");

    // An allow list lets only its sources in.
    let (ok, out) = d.cli(&["guard", "allow", "add", &format!("{b}/32")]);
    assert!(ok, "{out}");
    assert_eq!(ns.curl(a, port, "/", DROPPED), 0, "a source off the allow list was served");
    assert_eq!(ns.curl(b, port, "/", SERVED), 200);
    assert!(counter(&d, "not_allowed") > 0);
    // Deny wins over allow.
    assert!(d.cli(&["guard", "deny", "add", &format!("{b}/32")]).0);
    assert_eq!(ns.curl(b, port, "/", DROPPED), 0, "allow beat deny");

    let (ok, out) = d.cli(&["guard", "deny", "add", "10.0.0.300"]);
    assert!(!ok && out.contains("10.0.0.300"), "{out}");
}

/// The rate test's limit, and the connections the fast source opens at
/// once (well over its burst).
const RATE: u32 = 2;
const BURST: u32 = 4;
const FLOOD: usize = 30;

#[test]
fn a_source_over_its_connection_rate_is_dropped_while_another_is_served() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let [fast, normal] = ns.clients;
    let (d, port) = start(&ns, &format!("[guard]\nsyn_rate_per_sec = {RATE}\nsyn_burst = {BURST}"));
    // The flood: FLOOD connections at once from one source (curl -Z).
    let cli = ns.cli.clone();
    let url = format!("http://{}:{port}/flood/[1-{FLOOD}]", ns.server);
    let flood = std::thread::spawn(move || {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{cli}"))
            .args(["curl", "-s", "-Z", "--parallel-max", "64", "-o", "/dev/null", "-w", "%{http_code}\n"])
            .args(["--interface", &fast.to_string(), "--connect-timeout", "0.7", &url])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.trim() == "200").count()
    });
    // Meanwhile another source at a normal rate is served every time.
    let t0 = Instant::now();
    let mut served = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        assert_eq!(ns.curl(normal, port, "/normal", SERVED), 200, "the normal-rate source was not served");
        served += 1;
        std::thread::sleep(Duration::from_millis(1000 / (2 * RATE as u64)));
    }
    let ok = flood.join().unwrap();
    assert!(ok < FLOOD, "the flood was not limited: {ok} of {FLOOD} served");
    assert!(ok >= 1, "the flood's first connections were not served");
    assert!(counter(&d, "rate_limited") > 0);
    eprintln!("rate limit: {ok} of {FLOOD} flood connections served; {served} normal ones");
}

#[test]
fn no_xdp_program_is_left_on_the_interface_after_exit_or_a_crash() {
    if !privileged() {
        return;
    }
    let ns = Netns::new();
    let (mut d, _) = start(&ns, "");
    assert!(ns.link_show().contains("xdp"), "no XDP program attached: {}", ns.link_show());
    assert!(d.stop(), "the dispatcher did not exit cleanly");
    assert!(!ns.link_show().contains("xdp"), "XDP program left after SIGTERM: {}", ns.link_show());

    let (d, _) = start(&ns, "");
    assert!(ns.link_show().contains("xdp"));
    // SAFETY: killing this test's dispatcher.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    while ns.link_show().contains("xdp") && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!ns.link_show().contains("xdp"), "XDP program left after a crash: {}", ns.link_show());
    drop(d);
    // And a restart attaches again.
    let _d = start(&ns, "");
    assert!(ns.link_show().contains("xdp"));
}
