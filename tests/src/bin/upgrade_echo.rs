//! An app that takes every request as an upgrade: it answers
//! `101 Switching Protocols` (`Upgrade: echo`) and then sends back every
//! byte it gets, until the client closes. `cargo xtask bench`'s tunnel
//! section runs it in a proxy pool, behind nginx and on its own, so what
//! is measured is the tunnel (kernel splice, worker copy, nginx) and not
//! an app's framing: node's WebSocket echo spends more per byte than any
//! of them.
//!
//! Usage: `upgrade_echo [ADDR]` (default `127.0.0.1:$PORT`, as a proxy
//! pool's app gets it). A thread per connection, blocking I/O.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
};

/// The answer to any request.
const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n";
/// Largest request head taken.
const MAX_HEAD: usize = 16 << 10;
/// The echo's buffer: a read of this much is a write of as much.
const BUF: usize = 256 << 10;

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| {
        let port = std::env::var("PORT").unwrap_or_else(|_| {
            eprintln!("upgrade_echo: give ADDR, or PORT in the environment");
            std::process::exit(2)
        });
        format!("127.0.0.1:{port}")
    });
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("upgrade_echo: binding {addr}: {e}");
        std::process::exit(1)
    });
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(s) {
                        eprintln!("upgrade_echo: a connection ended: {e}");
                    }
                });
            }
            Err(e) => eprintln!("upgrade_echo: accept: {e}"),
        }
    }
}

/// Reads the request head, answers 101, then echoes what follows it.
fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; BUF];
    let mut have = 0;
    let end = loop {
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if have >= MAX_HEAD {
            return s.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n");
        }
        let n = s.read(&mut buf[have..MAX_HEAD])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
    };
    s.write_all(SWITCHING)?;
    // Bytes the client sent right after its head are the tunnel's.
    s.write_all(&buf[end..have])?;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            // The client is done: so are we (a half-close goes on through
            // the tunnel to it).
            return s.shutdown(std::net::Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}
