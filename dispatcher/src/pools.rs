//! The dispatcher's side of each pool: the control socket of its current
//! worker (slow-path requests out, responses in), and the worker's
//! supervision through `activation`.

use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{Context, Result};
use bytes::Bytes;
use dispatcher_ebpf::abi::RecordHeader;
use tokio::{
    io::AsyncReadExt,
    sync::{mpsc, watch},
};
use worker::proto::{ResponseHeader, BATCH_BYTES, MAX_FRAME, RESPONSE_HEADER_LEN, RESP_CLOSE, RESP_LAST};

use crate::{config::Pool, conns::Conns};

/// One pool at run time.
pub struct PoolLink {
    pub name: String,
    /// Slow-path queue limit (bytes in flight to the worker).
    pub queue_bytes: u64,
    /// Bytes of slow-path requests sent and not yet answered.
    pub inflight: AtomicU64,
    /// Sender to the current worker's control socket.
    tx: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
}

impl PoolLink {
    pub fn new(p: &Pool) -> Self {
        PoolLink {
            name: p.name.clone(),
            queue_bytes: p.queue_bytes as u64,
            inflight: AtomicU64::new(0),
            tx: Mutex::new(None),
        }
    }

    /// Sends a request record (header + data) to the worker. False when
    /// the pool has no live worker.
    pub fn send_record(&self, hdr: RecordHeader, data: &[u8]) -> bool {
        let mut buf = Vec::with_capacity(hdr.len as usize + 32);
        buf.extend_from_slice(&hdr.to_bytes());
        buf.extend_from_slice(data);
        match &*self.tx.lock().unwrap() {
            Some(tx) => tx.send(Bytes::from(buf)).is_ok(),
            None => false,
        }
    }

    pub fn has_worker(&self) -> bool {
        self.tx.lock().unwrap().as_ref().is_some_and(|t| !t.is_closed())
    }

    pub fn release(&self, bytes: u64) {
        let _ = self.inflight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }
}

/// A frame of a response, on its way to a connection.
#[derive(Debug)]
pub struct Frame {
    pub seq: u32,
    pub data: Bytes,
    pub last: bool,
    pub close: bool,
}

/// Makes a control socket for a new worker of `link`: our end is served
/// by a reader (responses → connections) and a writer task.
fn connect(link: &Arc<PoolLink>, conns: &Arc<Conns>) -> Result<OwnedFd> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    let (rd, wr) = ours.into_split();
    // Many response frames per read syscall.
    let mut rd = tokio::io::BufReader::with_capacity(BATCH_BYTES, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    *link.tx.lock().unwrap() = Some(tx);
    let name = link.name.clone();
    tokio::spawn(async move {
        if let Err(e) = worker::proto::write_batched(wr, rx).await {
            tracing::debug!(pool = %name, "control socket write: {e}");
        }
    });
    let conns = conns.clone();
    let name = link.name.clone();
    tokio::spawn(async move {
        let mut hdr = [0u8; RESPONSE_HEADER_LEN];
        loop {
            if rd.read_exact(&mut hdr).await.is_err() {
                break;
            }
            let h = ResponseHeader::from_bytes(&hdr).expect("header length");
            if h.len as usize > MAX_FRAME {
                tracing::error!(pool = %name, len = h.len, "oversized response frame; dropping the worker's socket");
                break;
            }
            let mut data = vec![0u8; h.len as usize];
            if rd.read_exact(&mut data).await.is_err() {
                break;
            }
            conns.deliver(
                h.conn,
                Frame { seq: h.seq, data: Bytes::from(data), last: h.flags & RESP_LAST != 0, close: h.flags & RESP_CLOSE != 0 },
            );
        }
        tracing::debug!(pool = %name, "control socket closed");
    });
    Ok(theirs.into())
}

/// Starts supervising `link`'s worker.
pub fn supervise(
    link: Arc<PoolLink>,
    pool: &Pool,
    command: PathBuf,
    args: Vec<String>,
    ring: impl Fn() -> Result<OwnedFd> + Send + 'static,
    conns: Arc<Conns>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let spec = activation::WorkerSpec {
        pool: pool.name.clone(),
        command,
        args,
        env: pool.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        user: Some(pool.user.clone()),
    };
    tokio::spawn(activation::supervise(
        spec,
        move || {
            let ctl = connect(&link, &conns)?;
            Ok(activation::Handles { ring: Some(ring()?), ctl })
        },
        stop,
    ))
}
