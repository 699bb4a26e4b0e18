//! The control channel between the dispatcher and one worker, as the
//! worker library offers it: the contract itself (records, frames, lease
//! messages; the protocol is described there) is `dispatcher_ebpf::wire`,
//! re-exported here, plus what both ends of the control socket share in
//! code: the batched writer and the access-log field escaping.

pub use dispatcher_ebpf::abi::{
    RecordHeader, RECORD_ABORT, RECORD_BODY, RECORD_HEAD, RECORD_HEADER_LEN, REC_CLOSE, REC_LAST, REC_SLOW,
};
pub use dispatcher_ebpf::wire::{
    DecodeError, FrameHeader, LeaseMsg, RecordKind, WorkerFrame, FRAME_HEADER_LEN, LATENCY_BUCKETS_US, LEASE_MSG_LEN,
    MAX_FRAME, NO_ENTRY, RESP_CLOSE, RESP_LAST, RESP_LOG, RESP_RELEASE, RESP_STATS, RESP_STOPPED, RESP_WANT_LEASE,
    STATS_WORDS,
};

/// A request's text for an access-log record: printable ASCII kept, `"`,
/// `\` and anything else as `\xHH` (no tab, newline or quote survives).
pub fn log_field(out: &mut Vec<u8>, b: &[u8]) {
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\' {
            out.push(c);
        } else {
            out.extend_from_slice(format!("\\x{c:02x}").as_bytes());
        }
    }
}

/// Bytes a control-socket end buffers per read, and batches per write.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Writes everything sent on `rx` to `wr`, one `write` per wake-up for all
/// that was queued meanwhile (both ends of the control socket use it: the
/// per-frame syscall was the dispatcher's main cost), calling `written`
/// with each batch once the socket has it. Ends when `rx` closes or a
/// write fails, returning the error.
pub async fn write_batched<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
    mut written: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut batch = Vec::new();
    while let Some(b) = rx.recv().await {
        // An empty message (no frame is empty) ends the writer once what
        // was queued before it is written.
        let mut end = b.is_empty();
        batch.clear();
        batch.extend_from_slice(&b);
        while !end {
            let Ok(more) = rx.try_recv() else { break };
            end = more.is_empty();
            batch.extend_from_slice(&more);
            if batch.len() >= BATCH_BYTES {
                break;
            }
        }
        if !batch.is_empty() {
            wr.write_all(&batch).await?;
            written(&batch);
        }
        if end {
            wr.flush().await?;
            return Ok(());
        }
    }
    Ok(())
}
