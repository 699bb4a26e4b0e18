//! The control socket's reading side: the records the dispatcher's slow
//! path framed (and its aborts), read by a task so that the worker's
//! `receive` can wait on them cancel-safely.

use dispatcher_ebpf::abi::{RecordHeader, RECORD_HEADER_LEN};
use dispatcher_ebpf::wire::MAX_FRAME;
use tokio::{io::AsyncReadExt, net::unix::OwnedReadHalf, sync::mpsc};

use crate::proto::BATCH_BYTES;

/// A record from the control socket: its header and data.
pub(crate) type Record = (RecordHeader, Vec<u8>);

/// Starts reading `rd`; the records come out of the returned channel,
/// which closes when the dispatcher closes the socket (or sends a record
/// over [`MAX_FRAME`]).
pub(crate) fn spawn_reader(rd: OwnedReadHalf) -> mpsc::Receiver<Record> {
    let mut rd = tokio::io::BufReader::with_capacity(BATCH_BYTES, rd);
    let (ftx, frames) = mpsc::channel(1024);
    // A reader task makes the control socket a cancel-safe stream.
    tokio::spawn(async move {
        let mut h = [0u8; RECORD_HEADER_LEN];
        loop {
            if rd.read_exact(&mut h).await.is_err() {
                return;
            }
            let hdr = RecordHeader::from_bytes(&h).expect("header length");
            if hdr.len as usize > MAX_FRAME {
                tracing::error!(len = hdr.len, "oversized record on the control socket");
                return;
            }
            let mut data = vec![0u8; hdr.len as usize];
            if rd.read_exact(&mut data).await.is_err() || ftx.send((hdr, data)).await.is_err() {
                return;
            }
        }
    });
    frames
}
