//! The control socket's reading side: the records the dispatcher's slow
//! path framed (and its aborts), read by a task so that the worker's
//! `receive` can wait on them cancel-safely.

use std::sync::Arc;

use dispatcher_ebpf::abi::RecordHeader;
use dispatcher_ebpf::wire::RecordKind;
use tokio::{net::unix::OwnedReadHalf, sync::mpsc};

use crate::answer::Outbound;

use crate::proto::{read_frame, BATCH_BYTES};

/// A record from the control socket: its header and data.
pub(crate) type Record = (RecordHeader, Vec<u8>);

/// Starts reading `rd`; the records come out of the returned channel,
/// which closes when the dispatcher closes the socket (or sends a record
/// over [`MAX_FRAME`]). What concerns streamed responses (written parts,
/// aborted connections) goes to `out` here, not through the channel: the
/// puller is not polled while a draining worker finishes its handlers,
/// and those may be streaming.
pub(crate) fn spawn_reader(rd: OwnedReadHalf, out: Arc<Outbound>) -> mpsc::Receiver<Record> {
    let mut rd = tokio::io::BufReader::with_capacity(BATCH_BYTES, rd);
    let (ftx, frames) = mpsc::channel(1024);
    // A reader task makes the control socket a cancel-safe stream.
    tokio::spawn(async move {
        loop {
            let record = match read_frame::<RecordHeader>(&mut rd).await {
                Ok(r) => r,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        tracing::error!("control socket: {e}");
                    }
                    return;
                }
            };
            match record.0.record_kind() {
                Ok(RecordKind::Written) => {
                    out.stream_written(record.0.conn, record.0.seq, record.0.content_length);
                    continue;
                }
                Ok(RecordKind::Abort) => out.stream_aborted(record.0.conn),
                _ => {}
            }
            if ftx.send(record).await.is_err() {
                return;
            }
        }
    });
    frames
}
