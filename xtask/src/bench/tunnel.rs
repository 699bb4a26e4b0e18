//! The bench's tunnel section: bytes through an upgraded connection (what
//! a WebSocket becomes after its 101), the kernel's splice against the
//! copies a proxy makes.
//!
//! The app is `upgrade_echo` (tests/src/bin): 101 to any request, then
//! every byte back. Setups, in report order:
//! - direct: the client straight at the app (no proxy; the ceiling);
//! - nginx: `proxy_pass` with the usual upgrade fields
//!   (`proxy_set_header Upgrade $http_upgrade; Connection "upgrade"`);
//! - copy: a proxy pool with `fast_path.tunnel_splice = false` (the worker
//!   copies both ways, 64 KiB at a time);
//! - splice: the same pool with splicing on (the default): the kernel
//!   redirects between the client's socket and the app's.
//!
//! Each run opens [`CONNECTIONS`] tunnels; on each a thread writes 256 KiB
//! pieces for the run's seconds while another reads the echo, until all
//! it wrote is back (bytes echoed per second, one way; whole-system CPU
//! seconds per GiB); then, for as long, each sends 64 bytes and waits
//! for their echo (round trips per second; CPU seconds per 100k).

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::{free_port, median, nginx_head, run_nginx, spawn_dispatcher, system_busy_seconds, wait_port, Procs};

/// The setups, in report order; the last is the one the ratios are of.
pub(super) const SETUPS: [&str; 4] = ["direct", "nginx", "copy", "splice"];
/// Tunnels open at once in a run.
pub(super) const CONNECTIONS: usize = 4;
/// Size of each write.
const PIECE: usize = 256 << 10;

/// Size of a ping-pong message.
const PING: usize = 64;

/// One run of one setup: a bulk echo, then a ping-pong.
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    /// MiB echoed per second (counted once, not per direction).
    mib_s: f64,
    /// Whole-system CPU seconds per GiB echoed.
    cpu_per_gib: f64,
    /// Ping-pong round trips per second (all tunnels).
    trips_s: f64,
    /// Whole-system CPU seconds per 100k round trips.
    cpu_per_100k: f64,
}

/// Starts the app and the setups in front of it; their ports in
/// [`SETUPS`] order.
pub(super) fn start(bin: &Path, dir: &Path, procs: &mut Procs) -> Result<Vec<u16>> {
    let d = dir.join("tunnel");
    fs::create_dir_all(&d)?;
    // A copy the pools' unprivileged user can run.
    let app = d.join("upgrade_echo");
    fs::copy(bin.join("upgrade_echo"), &app)
        .with_context(|| format!("copying {} (built by the tests crate)", bin.join("upgrade_echo").display()))?;
    let ok = Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status()?;
    ensure!(ok.success(), "chmod -R a+rX {}", dir.display());
    let ports: Vec<u16> = SETUPS.iter().map(|_| free_port()).collect();
    procs.0.push(
        Command::new(&app)
            .arg(format!("127.0.0.1:{}", ports[0]))
            .stdout(Stdio::null())
            .spawn()
            .context("starting upgrade_echo")?,
    );
    wait_port(ports[0], "upgrade_echo")?;
    procs.0.push(start_nginx(&d, ports[1], ports[0])?);
    wait_port(ports[1], "nginx (tunnel)")?;
    for (i, splice) in [(2, false), (3, true)] {
        let name = SETUPS[i];
        let cfg = format!(
            "listen = \"127.0.0.1:{}\"\ninstance = \"bench-tunnel-{name}\"\n[fast_path]\ntunnel_splice = {splice}\n[[pool]]\nname = \"tunnel\"\nroutes = [\"*/\"]\ncommand = \"dispatcher-worker\"\nargs = [\"proxy\", \"--\", {:?}]\nstart_mode = \"always-running\"\n",
            ports[i],
            app.display().to_string()
        );
        procs.0.push(spawn_dispatcher(bin, dir, &format!("tunnel-{name}"), &cfg, "warn")?);
        wait_port(ports[i], "dispatcher (tunnel)")?;
    }
    // One tunnel through each, so that a setup that cannot tunnel fails
    // before the run, not in it.
    for (port, name) in ports.iter().zip(SETUPS) {
        run(*port, 1, Duration::from_millis(100)).with_context(|| format!("a tunnel through {name}"))?;
    }
    Ok(ports)
}

fn start_nginx(dir: &Path, port: u16, app: u16) -> Result<std::process::Child> {
    let conf = format!(
        r#"{head}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://127.0.0.1:{app};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            # Its tunnel buffers, one per direction: as large as the
            # app's and the worker's (the default, 4 KiB, is a system
            # call per 4 KiB).
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            proxy_read_timeout 600s;
        }}
    }}
}}
"#,
        head = nginx_head(dir)
    );
    run_nginx(dir, &conf, "nginx-error.log", "starting nginx (tunnel)")
}

/// One measured run against `port`: `seconds` of bulk echo, then as many
/// of ping-pong.
pub(super) fn measure(port: u16, seconds: u32) -> Result<Sample> {
    let time = Duration::from_secs(seconds.into());
    let cpu0 = system_busy_seconds();
    let (bytes, elapsed) = run(port, CONNECTIONS, time)?;
    let cpu = system_busy_seconds() - cpu0;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let cpu0 = system_busy_seconds();
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CONNECTIONS).map(|_| std::thread::spawn(move || ping_pong(port, t0 + time))).collect();
    let mut trips = 0;
    for t in threads {
        trips += t.join().map_err(|_| anyhow::anyhow!("a ping-pong thread panicked"))??;
    }
    let (ptime, pcpu) = (t0.elapsed().as_secs_f64(), system_busy_seconds() - cpu0);
    Ok(Sample {
        mib_s: bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        cpu_per_gib: cpu / gib.max(1e-9),
        trips_s: trips as f64 / ptime,
        cpu_per_100k: pcpu / (trips as f64).max(1.0) * 100_000.0,
    })
}

/// One tunnel's ping-pong until `deadline`: a 64-byte message, then its
/// echo, again and again (a chat or a game's traffic, not a transfer):
/// the round trips made.
fn ping_pong(port: u16, deadline: Instant) -> Result<u64> {
    let mut s = upgrade(port)?;
    let (msg, mut back) = ([42u8; PING], [0u8; PING]);
    let mut trips = 0;
    while Instant::now() < deadline {
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reading a ping's echo")?;
        ensure!(back == msg, "a ping came back different");
        trips += 1;
    }
    Ok(trips)
}

/// Opens `conns` tunnels and echoes through them for `time`: the bytes
/// echoed (all of them came back) and how long it took.
fn run(port: u16, conns: usize, time: Duration) -> Result<(u64, Duration)> {
    let t0 = Instant::now();
    let deadline = t0 + time;
    let threads: Vec<_> = (0..conns).map(|_| std::thread::spawn(move || tunnel(port, deadline))).collect();
    let mut total = 0;
    for t in threads {
        total += t.join().map_err(|_| anyhow::anyhow!("a tunnel's thread panicked"))??;
    }
    Ok((total, t0.elapsed()))
}

/// One tunnel: upgrade, then write until `deadline` while reading the
/// echo, until all that was written came back.
fn tunnel(port: u16, deadline: Instant) -> Result<u64> {
    bulk(upgrade(port)?, deadline)
}

/// A tunnel through `port`, after its 101.
fn upgrade(port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /tunnel HTTP/1.1\r\nHost: bench\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(s.read(&mut byte)? == 1 && head.len() < 16 << 10, "the connection ended before a whole answer");
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("answered {:?}, not 101", String::from_utf8_lossy(&head[..head.len().min(40)]));
    }
    Ok(s)
}

/// One tunnel's write-while-reading echo.
fn bulk(mut s: TcpStream, deadline: Instant) -> Result<u64> {
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut w = s.try_clone()?;
    let writer = {
        let (written, done) = (written.clone(), done.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let piece: Vec<u8> = (0..PIECE).map(|i| (i % 251) as u8).collect();
            let r = (|| {
                while Instant::now() < deadline {
                    w.write_all(&piece)?;
                    written.fetch_add(PIECE as u64, Ordering::Release);
                }
                Ok(())
            })();
            done.store(true, Ordering::Release);
            r
        })
    };
    // Short read time-outs, to see the writer finish while the echo has
    // caught up (nothing more would come).
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = vec![0u8; PIECE];
    let (mut read, mut last) = (0u64, Instant::now());
    loop {
        if done.load(Ordering::Acquire) && read >= written.load(Ordering::Acquire) {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => bail!("the tunnel closed with {} bytes not echoed", written.load(Ordering::Acquire) - read),
            Ok(n) => {
                read += n as u64;
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                ensure!(last.elapsed() < Duration::from_secs(10), "no echo for 10 s ({read} bytes back)");
            }
            Err(e) => return Err(e).context("reading the echo"),
        }
    }
    writer.join().map_err(|_| anyhow::anyhow!("a writer panicked"))?.context("writing into the tunnel")?;
    ensure!(
        read == written.load(Ordering::Acquire),
        "{read} bytes echoed for {} written",
        written.load(Ordering::Acquire)
    );
    Ok(read)
}

/// The section's table: `samples[setup][round]`.
pub(super) fn write(md: &mut String, json: &mut Vec<String>, samples: &[Vec<Sample>], seconds: u32) -> Result<()> {
    use std::fmt::Write as _;
    let last = SETUPS.len() - 1;
    writeln!(md, "\n## Tunnels (upgraded connections)\n")?;
    writeln!(md, "`upgrade_echo` (tests/src/bin: 101, then every byte back) on its own (direct), behind nginx (`proxy_pass`, `Upgrade`/`Connection` set, `proxy_buffer_size 64k`), in a proxy pool copied by the worker (copy: `fast_path.tunnel_splice = false`) and in the same pool spliced by the kernel (splice). {CONNECTIONS} tunnels at once. Bulk: each written 256 KiB at a time for {seconds} s while its echo is read back (MiB/s echoed). Ping-pong: for {seconds} s more, each sends 64 bytes and waits for them to come back. CPU is the whole system's.")?;
    let heads: String = SETUPS[..last].iter().map(|p| format!(" splice/{p} |")).collect();
    // (title, unit, its figure, its CPU figure, CPU unit)
    type Of = fn(&Sample) -> f64;
    let tables: [(&str, &str, Of, Of, &str); 2] = [
        ("Bulk echo", "MiB/s", |x| x.mib_s, |x| x.cpu_per_gib, "CPU s / GiB"),
        (
            "Ping-pong (64 B, one at a time per tunnel)",
            "round trips/s",
            |x| x.trips_s,
            |x| x.cpu_per_100k,
            "CPU s / 100k trips",
        ),
    ];
    for (title, unit, of, cpu_of, cpu_unit) in tables {
        writeln!(md, "\n{title}:\n\n| setup | {unit} | {cpu_unit} |{heads}")?;
        writeln!(md, "|---|---|---|{}", "---|".repeat(last))?;
        for (si, setup) in SETUPS.iter().enumerate() {
            let s = &samples[si];
            let (m, lo, hi) = median(s.iter().map(of).collect());
            let cpu = median(s.iter().map(cpu_of).collect()).0;
            let cells: String = if si == last {
                (0..last)
                    .map(|pi| median(samples[last].iter().zip(&samples[pi]).map(|(x, y)| of(x) / of(y)).collect()))
                    .map(|(m, lo, hi)| format!(" {m:.2} ({lo:.2}–{hi:.2}) |"))
                    .collect()
            } else {
                " |".repeat(last)
            };
            writeln!(md, "| {setup} | {m:.0} ({lo:.0}–{hi:.0}) | {cpu:.2} |{cells}")?;
        }
    }
    for (si, setup) in SETUPS.iter().enumerate() {
        let s = &samples[si];
        let (m, lo, hi) = median(s.iter().map(|x| x.mib_s).collect());
        let (t, tlo, thi) = median(s.iter().map(|x| x.trips_s).collect());
        json.push(format!(
            "{{\"case\":\"tunnel\",\"setup\":\"{setup}\",\"mib_s\":{m:.1},\"mib_s_min\":{lo:.1},\"mib_s_max\":{hi:.1},\"cpu_s_per_gib\":{:.3},\"trips_s\":{t:.1},\"trips_s_min\":{tlo:.1},\"trips_s_max\":{thi:.1},\"cpu_s_per_100k_trips\":{:.3}}}",
            median(s.iter().map(|x| x.cpu_per_gib).collect()).0,
            median(s.iter().map(|x| x.cpu_per_100k).collect()).0,
        ));
    }
    Ok(())
}
