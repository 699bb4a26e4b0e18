//! The XDP guard on a veth interface, between network namespaces this
//! test creates: deny and allow lists (from the configuration and changed
//! live from the CLI), per-source SYN rate limits, counters, and a clean
//! interface after exit.

use std::time::{Duration, Instant};

use tests::{privileged, signal, wait_until, Dispatcher, Netns, PoolDef};

/// A connection attempt the guard drops fails within this.
const DROPPED: Duration = Duration::from_millis(700);
/// A served request's connect time-out (generous: the machine is shared).
const SERVED: Duration = Duration::from_secs(5);

/// Starts a dispatcher in `ns`'s server namespace, listening on all its
/// addresses, guarded on its veth; returns it and its port.
fn start(ns: &Netns, extra: &str) -> (Dispatcher, u16) {
    let port = tests::free_port();
    let listen = format!("0.0.0.0:{port}");
    let d = Dispatcher::start_with(
        &[PoolDef::echo("p", &["*/"])],
        extra,
        Some(&ns.srv),
        &["--listen", &listen, "--iface", &ns.veth],
    );
    (d, port)
}

/// A namespace pair, where the test can run (`None` skips it).
fn netns() -> Option<Netns> {
    privileged().then(Netns::new)
}

fn counter(d: &Dispatcher, name: &str) -> u64 {
    let (ok, out) = d.cli(&["guard", "show"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}: {out}"))
}

#[test]
fn a_denied_source_gets_no_connection_and_an_allowed_one_is_served() {
    let Some(ns) = netns() else { return };
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
    let Some(ns) = netns() else { return };
    let [a, b] = ns.clients;
    let (d, port) = start(&ns, "");
    assert_eq!(ns.curl(a, port, "/", SERVED), 200);

    // `dispatcher guard LIST OP ADDR`, which must succeed.
    let guard = |list: &str, op: &str, addr: &str| {
        let (ok, out) = d.cli(&["guard", list, op, addr]);
        assert!(ok, "{out}");
    };
    guard("deny", "add", &a.to_string());
    assert_eq!(ns.curl(a, port, "/", DROPPED), 0, "deny add did not take effect");
    assert_eq!(ns.curl(b, port, "/", SERVED), 200);
    guard("deny", "del", &a.to_string());
    assert_eq!(ns.curl(a, port, "/", SERVED), 200, "deny del did not take effect");

    // An allow list lets only its sources in.
    guard("allow", "add", &format!("{b}/32"));
    assert_eq!(ns.curl(a, port, "/", DROPPED), 0, "a source off the allow list was served");
    assert_eq!(ns.curl(b, port, "/", SERVED), 200);
    assert!(counter(&d, "not_allowed") > 0);
    // Deny wins over allow.
    guard("deny", "add", &format!("{b}/32"));
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
    let Some(ns) = netns() else { return };
    let [fast, normal] = ns.clients;
    let (d, port) = start(&ns, &format!("[guard]\nsyn_rate_per_sec = {RATE}\nsyn_burst = {BURST}"));
    // The flood: FLOOD connections at once from one source (curl -Z;
    // `--parallel-immediate`, or curl may wait for its first connection
    // and reuse it, and then there is no flood: a CI run saw 30 of 30).
    let cli = ns.cli.clone();
    let url = format!("http://{}:{port}/flood/[1-{FLOOD}]", ns.server);
    let flood = std::thread::spawn(move || {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{cli}"))
            .args([
                "curl",
                "-s",
                "-Z",
                "--parallel-immediate",
                "--parallel-max",
                "64",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\n",
            ])
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
    let Some(ns) = netns() else { return };
    let (mut d, _) = start(&ns, "");
    assert!(ns.link_show().contains("xdp"), "no XDP program attached: {}", ns.link_show());
    assert!(d.stop(), "the dispatcher did not exit cleanly");
    assert!(!ns.link_show().contains("xdp"), "XDP program left after SIGTERM: {}", ns.link_show());

    let (d, _) = start(&ns, "");
    assert!(ns.link_show().contains("xdp"));
    signal(d.pid(), libc::SIGKILL);
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || !ns.link_show().contains("xdp"));
    assert!(!ns.link_show().contains("xdp"), "XDP program left after a crash: {}", ns.link_show());
    drop(d);
    // And a restart attaches again.
    let _d = start(&ns, "");
    assert!(ns.link_show().contains("xdp"));
}

/// `BPF_PROG_TEST_RUN` of the pinned program at `pin` on one frame: the
/// XDP action it returns (1 drop, 2 pass).
fn test_run(pin: &std::path::Path, frame: &[u8]) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let get = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: BPF_OBJ_GET (7) with its attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, &get as *const ObjGet, std::mem::size_of::<ObjGet>()) };
    assert!(fd >= 0, "opening {}: {}", pin.display(), std::io::Error::last_os_error());
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
    }
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRun {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: BPF_PROG_TEST_RUN (10) with its attr and buffers that live
    // across the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 10, &mut attr as *mut TestRun, std::mem::size_of::<TestRun>()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd.
    unsafe { libc::close(fd as i32) };
    assert_eq!(r, 0, "BPF_PROG_TEST_RUN: {err}");
    attr.retval
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn eth(types: &[u16]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&types[0].to_be_bytes());
    for t in &types[1..] {
        // A VLAN tag: TCI (VLAN 7), then the next type.
        f.extend_from_slice(&[0x00, 0x07]);
        f.extend_from_slice(&t.to_be_bytes());
    }
    f
}

fn tcp_syn(port: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&port.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t
}

fn ipv4(src: [u8; 4], options: usize, frag: u16, l4: &[u8]) -> Vec<u8> {
    let ihl = 5 + options / 4;
    let mut h = vec![0u8; ihl * 4];
    h[0] = 0x40 | ihl as u8;
    let total = (h.len() + l4.len()) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = 6;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&[10, 0, 0, 1]);
    for b in &mut h[20..] {
        *b = 1; // NOP options
    }
    h.extend_from_slice(l4);
    h
}

/// IPv6 with extension headers `ext` (next-header value, bytes) before TCP.
fn ipv6(src: std::net::Ipv6Addr, ext: &[(u8, Vec<u8>)], l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    let payload: usize = ext.iter().map(|(_, e)| e.len()).sum::<usize>() + l4.len();
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = ext.first().map_or(6, |(n, _)| *n);
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    for (i, (_, e)) in ext.iter().enumerate() {
        let mut e = e.clone();
        e[0] = ext.get(i + 1).map_or(6, |(n, _)| *n);
        h.extend_from_slice(&e);
    }
    h.extend_from_slice(l4);
    h
}

#[test]
fn the_guard_parses_vlan_tags_ip_options_and_ipv6_extension_headers_or_passes() {
    let Some(ns) = netns() else { return };
    let (d, port) = start(&ns, "[guard]\ndeny = [\"198.51.100.7\", \"2001:db8::7\"]");
    let pin = d.pin_dir().join("guard");
    let bad4 = [198, 51, 100, 7];
    let good4 = [198, 51, 100, 8];
    let bad6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let syn = tcp_syn(port);
    let frame = |l2: Vec<u8>, l3: Vec<u8>| [l2, l3].concat();
    let hop = |len8: u8| {
        let mut e = vec![0u8; (len8 as usize + 1) * 8];
        e[1] = len8;
        e
    };
    let frag = |offset: u16| {
        let mut e = vec![0u8; 8];
        e[2..4].copy_from_slice(&(offset << 3).to_be_bytes());
        e
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("IPv4", frame(eth(&[0x0800]), ipv4(bad4, 0, 0, &syn)), XDP_DROP),
        ("IPv4 with options", frame(eth(&[0x0800]), ipv4(bad4, 8, 0, &syn)), XDP_DROP),
        ("802.1Q", frame(eth(&[0x8100, 0x0800]), ipv4(bad4, 0, 0, &syn)), XDP_DROP),
        ("802.1ad + 802.1Q", frame(eth(&[0x88a8, 0x8100, 0x0800]), ipv4(bad4, 4, 0, &syn)), XDP_DROP),
        ("IPv6", frame(eth(&[0x86dd]), ipv6(bad6, &[], &syn)), XDP_DROP),
        (
            "IPv6 hop-by-hop + dest opts",
            frame(eth(&[0x86dd]), ipv6(bad6, &[(0, hop(0)), (60, hop(1))], &syn)),
            XDP_DROP,
        ),
        ("IPv6 first fragment", frame(eth(&[0x86dd]), ipv6(bad6, &[(44, frag(0))], &syn)), XDP_DROP),
        ("IPv6 later fragment", frame(eth(&[0x86dd]), ipv6(bad6, &[(44, frag(100))], &syn)), XDP_PASS),
        ("IPv4 later fragment", frame(eth(&[0x0800]), ipv4(bad4, 0, 100, &syn)), XDP_PASS),
        ("another port", frame(eth(&[0x0800]), ipv4(bad4, 0, 0, &tcp_syn(port.wrapping_add(1)))), XDP_PASS),
        ("an allowed source", frame(eth(&[0x0800]), ipv4(good4, 0, 0, &syn)), XDP_PASS),
        ("truncated TCP", frame(eth(&[0x0800]), ipv4(bad4, 0, 0, &syn[..10])), XDP_PASS),
        ("ARP", [eth(&[0x0806]), vec![0u8; 28]].concat(), XDP_PASS),
    ];
    for (what, f, want) in cases {
        assert_eq!(test_run(&pin, &f), want, "{what}");
    }
}

/// Opens a TCP connection from the client namespace's first address
/// (its primary one): `None` when no connection was made in `timeout`.
fn connect_from_client(ns: &Netns, port: u16, timeout: Duration) -> Option<std::net::TcpStream> {
    let (path, server) = (format!("/run/netns/{}", ns.cli), ns.server);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on this thread only (network namespaces are per
        // thread), with an open namespace fd.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        std::net::TcpStream::connect_timeout(&(server, port).into(), timeout).ok()
    })
    .join()
    .unwrap()
}

#[test]
fn a_source_with_its_most_open_connections_gets_no_more() {
    let Some(ns) = netns() else { return };
    let [a, b] = ns.clients;
    let (d, port) = start(&ns, "[guard]\nmax_connections_per_source = 2");
    let first = connect_from_client(&ns, port, SERVED).expect("first connection");
    let second = connect_from_client(&ns, port, SERVED).expect("second connection");
    assert!(connect_from_client(&ns, port, DROPPED).is_none(), "a third connection from {a} got through");
    assert!(counter(&d, "too_many_connections") > 0);
    // Another source is not affected.
    assert_eq!(ns.curl(b, port, "/", SERVED), 200);
    // Closing one makes room again.
    drop(first);
    let t0 = Instant::now();
    let third = loop {
        if let Some(c) = connect_from_client(&ns, port, DROPPED) {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no room after a close: {}", d.log());
    };
    drop((second, third));
}
