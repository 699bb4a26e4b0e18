//! A client whose TCP segments overlap what the server already received,
//! as a retransmission re-cut by the sender does: a hand-made TCP client
//! (raw IP socket out, packet socket in) in a network namespace this test
//! creates, from an address no kernel there owns (so no stack answers for
//! it). The kernel queues such a segment whole and the sockmap path hands
//! it whole to the verdict program; before `programs/retrans.rs` its old
//! bytes were framed a second time (a garbled second request on the kernel
//! path) or passed to user space twice (a corrupted upload on the slow
//! path).

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use tests::{checksum, privileged, run, Dispatcher, Netns, PoolDef};

/// How long to wait for the server's answers.
const ANSWER: Duration = Duration::from_secs(20);

/// One TCP connection driven by hand.
struct RawTcp {
    out: OwnedFd,
    inp: OwnedFd,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    /// Our next sequence number, and the server's next.
    seq: u32,
    ack: u32,
    /// The server's payload, in order.
    got: Vec<u8>,
    fin: bool,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Runs `f` with this thread in network namespace `ns` (sockets made there
/// stay there).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(format!("/run/netns/{ns}")).expect("opening the namespace");
            // SAFETY: plain syscall on a valid descriptor; affects this thread.
            assert_eq!(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            f()
        })
        .join()
        .unwrap()
    })
}

impl RawTcp {
    fn open(ns: &str, src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> RawTcp {
        let (out, inp) = in_netns(ns, || {
            // SAFETY: socket(2); the descriptors are owned from here on.
            unsafe {
                let out = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
                let inp = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                    (libc::ETH_P_IP as u16).to_be() as i32,
                );
                assert!(out >= 0 && inp >= 0, "raw sockets: {}", std::io::Error::last_os_error());
                (OwnedFd::from_raw_fd(out), OwnedFd::from_raw_fd(inp))
            }
        });
        RawTcp {
            out,
            inp,
            src,
            dst,
            sport: 40000 + (std::process::id() % 20000) as u16,
            dport,
            seq: 0x1000_0000,
            ack: 0,
            got: Vec::new(),
            fin: false,
        }
    }

    /// Sends one segment (`seq` given, so a test can go back).
    fn send(&self, seq: u32, flags: u8, data: &[u8]) {
        let mut tcp = Vec::with_capacity(20 + data.len());
        tcp.extend_from_slice(&self.sport.to_be_bytes());
        tcp.extend_from_slice(&self.dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&if flags & ACK != 0 { self.ack } else { 0 }.to_be_bytes());
        tcp.extend_from_slice(&[5 << 4, flags]);
        tcp.extend_from_slice(&65535u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(data);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        let c = fold(sum16(&tcp, sum16(&pseudo, 0)));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let c = fold(sum16(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&tcp);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(self.dst.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto(2) with a valid buffer and address.
        let n = unsafe {
            libc::sendto(
                self.out.as_raw_fd(),
                ip.as_ptr() as *const _,
                ip.len(),
                0,
                &to as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(n as usize, ip.len(), "sendto: {}", std::io::Error::last_os_error());
    }

    /// Takes the server's segments for this connection for up to `wait`,
    /// acknowledging its data in order; returns the flags seen.
    fn pump(&mut self, wait: Duration) -> u8 {
        let t0 = Instant::now();
        let mut seen = 0;
        let mut buf = vec![0u8; 70000];
        while t0.elapsed() < wait {
            // SAFETY: recv(2) into a buffer we own.
            let n = unsafe { libc::recv(self.inp.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 0xf) * 4;
            if p.len() < ihl + 20 || p[9] != 6 || p[12..16] != self.dst.octets() || p[16..20] != self.src.octets() {
                continue;
            }
            let t = &p[ihl..];
            if u16::from_be_bytes([t[0], t[1]]) != self.dport || u16::from_be_bytes([t[2], t[3]]) != self.sport {
                continue;
            }
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            let flags = t[13];
            seen |= flags;
            let data = &t[usize::from(t[12] >> 4) * 4..total - ihl];
            if flags & SYN != 0 {
                self.ack = seq.wrapping_add(1);
                return seen;
            }
            if seq == self.ack && !data.is_empty() {
                self.got.extend_from_slice(data);
                self.ack = self.ack.wrapping_add(data.len() as u32);
            }
            if flags & FIN != 0 && seq.wrapping_add(data.len() as u32) == self.ack {
                self.ack = self.ack.wrapping_add(1);
                self.fin = true;
            }
            if !data.is_empty() || flags & FIN != 0 {
                self.send(self.seq, ACK, &[]);
            }
            if flags & RST != 0 {
                return seen;
            }
        }
        seen
    }

    fn connect(&mut self) {
        for _ in 0..5 {
            self.send(self.seq, SYN, &[]);
            if self.pump(Duration::from_secs(1)) & SYN != 0 {
                self.seq = self.seq.wrapping_add(1);
                self.send(self.seq, ACK, &[]);
                return;
            }
        }
        panic!("no SYN-ACK from {}:{}", self.dst, self.dport);
    }

    /// Sends `data` in one segment and moves on past it.
    fn write(&mut self, data: &[u8]) {
        self.send(self.seq, ACK | PSH, data);
        self.seq = self.seq.wrapping_add(data.len() as u32);
    }

    /// Sends a segment that starts `back` bytes before our next sequence
    /// number (`old`, the bytes already sent there, again), then `new`.
    fn write_overlapping(&mut self, old: &[u8], new: &[u8]) {
        let mut seg = old.to_vec();
        seg.extend_from_slice(new);
        self.send(self.seq.wrapping_sub(old.len() as u32), ACK | PSH, &seg);
        self.seq = self.seq.wrapping_add(new.len() as u32);
    }

    /// Takes segments until `done` says the answers are in (or time out).
    fn read_until(&mut self, done: impl Fn(&[u8]) -> bool) -> String {
        let t0 = Instant::now();
        while !done(&self.got) && !self.fin && t0.elapsed() < ANSWER {
            self.pump(Duration::from_millis(50));
        }
        String::from_utf8_lossy(&self.got).into_owned()
    }
}

/// The peer's MAC address, so the server side can reach the fake client
/// address without ARP (nobody owns it to answer).
fn peer_mac(ns: &Netns) -> String {
    let peer = format!("{}b", ns.veth.trim_end_matches('a'));
    let out = Command::new("ip").args(["-n", &ns.cli, "-o", "link", "show", &peer]).output().expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1);
    mac.unwrap_or_else(|| panic!("no MAC for {peer}: {text}")).to_string()
}

fn setup() -> Option<(Netns, Dispatcher, RawTcp)> {
    if !privileged() {
        return None;
    }
    let ns = Netns::new();
    let port = tests::free_port();
    let listen = format!("0.0.0.0:{port}");
    let d = Dispatcher::start_with(
        &[PoolDef { name: "app", routes: &["*/"], args: &[], extra: "", command: Some("axum-example") }],
        "",
        Some(&ns.srv),
        &["--listen", &listen],
    );
    let [a, _] = ns.clients;
    let fake = Ipv4Addr::new(a.octets()[0], a.octets()[1], a.octets()[2], 9);
    let mac = peer_mac(&ns);
    run(&["ip", "-n", &ns.srv, "neigh", "replace", &fake.to_string(), "lladdr", &mac, "dev", &ns.veth]);
    let mut c = RawTcp::open(&ns.cli, fake, ns.server, port);
    c.connect();
    Some((ns, d, c))
}

fn retransmits(d: &Dispatcher, what: &str) -> u64 {
    d.stats()["retransmits"][what].as_u64().unwrap_or_else(|| panic!("no retransmits.{what}: {}", d.stats()))
}

#[test]
fn overlapping_segments_are_framed_once_on_the_kernel_path() {
    let Some((_ns, d, mut c)) = setup() else { return };
    // Two pipelined GETs; the second segment repeats the last 12 bytes of
    // the first.
    let first = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /api/it";
    let rest = b"ems HTTP/1.1\r\nHost: x\r\n\r\n";
    c.write(first);
    c.pump(Duration::from_millis(200));
    c.write_overlapping(&first[first.len() - 12..], rest);
    let text = c.read_until(|g| String::from_utf8_lossy(g).matches("HTTP/1.1 ").count() >= 2 && g.ends_with(b"]"));
    let answers: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 2, "two answers, once each: {text:?}");
    assert!(answers[0].starts_with("200 ") && answers[0].contains("an axum app"), "{text:?}");
    assert!(answers[1].starts_with("200 ") && answers[1].ends_with("[]"), "{text:?}");
    assert!(retransmits(&d, "trimmed") >= 1, "{}", d.stats());
    assert_eq!(retransmits(&d, "no_seq"), 0, "{}", d.stats());
}

#[test]
fn overlapping_segments_reach_a_slow_path_upload_once() {
    let Some((_ns, d, mut c)) = setup() else { return };
    // A chunked upload (the slow path from its head), its body sent in
    // segments that each repeat part of the one before.
    c.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    let body: Vec<u8> = (0..6000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut wire = Vec::new();
    for part in body.chunks(1000) {
        wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        wire.extend_from_slice(part);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let mut sent = 0;
    for (k, seg) in wire.chunks(700).enumerate() {
        if k == 0 {
            c.write(seg);
        } else {
            let back = 100 + 37 * (k % 5);
            c.write_overlapping(&wire[sent - back..sent], seg);
        }
        sent += seg.len();
        c.pump(Duration::from_millis(20));
    }
    let text = c.read_until(|g| g.ends_with(b"}"));
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
    let json = &text[text.find("\r\n\r\n").expect("a head") + 4..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(v["bytes"].as_u64(), Some(body.len() as u64), "{v}");
    assert_eq!(v["fnv1a64"].as_str(), Some(checksum(&body).to_string().as_str()), "{v}");
    assert!(retransmits(&d, "trimmed") >= 5, "{}", d.stats());
}
