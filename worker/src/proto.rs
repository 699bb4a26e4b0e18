//! The control channel between the dispatcher and one worker, as the
//! worker library offers it: the contract itself (records, frames, lease
//! messages; the protocol is described there) is `dispatcher_ebpf::wire`,
//! re-exported here, plus what both ends of the control socket share in
//! code: the frame reader, the batched writer and the access-log field
//! escaping.

pub use dispatcher_ebpf::abi::{
    RecordHeader, RECORD_ABORT, RECORD_BODY, RECORD_HEAD, RECORD_HEADER_LEN, REC_CLOSE, REC_LAST, REC_SLOW,
};
pub use dispatcher_ebpf::wire::{
    DecodeError, FrameHeader, LeaseMsg, RecordKind, WorkerFrame, FRAME_HEADER_LEN, LATENCY_BUCKETS_US, LEASE_MSG_LEN,
    MAX_FRAME, NO_ENTRY, RESP_CLOSE, RESP_LAST, RESP_LOG, RESP_RELEASE, RESP_STATS, RESP_STOPPED, RESP_WANT_LEASE,
    STATS_WORDS, TUNNEL_MAX_EARLY,
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

/// A control-socket header: fixed-size, saying how many bytes follow
/// ([`RecordHeader`] from the dispatcher, [`FrameHeader`] from the worker).
pub trait FrameHead: Sized {
    const LEN: usize;
    fn parse(b: &[u8]) -> Option<Self>;
    /// Bytes that follow the header.
    fn body_len(&self) -> u32;
}

impl FrameHead for RecordHeader {
    const LEN: usize = RECORD_HEADER_LEN;
    fn parse(b: &[u8]) -> Option<Self> {
        RecordHeader::from_bytes(b)
    }
    fn body_len(&self) -> u32 {
        self.len
    }
}

impl FrameHead for FrameHeader {
    const LEN: usize = FRAME_HEADER_LEN;
    fn parse(b: &[u8]) -> Option<Self> {
        FrameHeader::from_bytes(b)
    }
    fn body_len(&self) -> u32 {
        self.len
    }
}

// `read_frame` reads a header into a 64-byte buffer.
const _: () = assert!(RECORD_HEADER_LEN <= 64 && FRAME_HEADER_LEN <= 64);

/// Reads one frame: its header, then the bytes it announces. An error
/// ends the stream: the socket closed (or failed), or the header
/// announced more than [`MAX_FRAME`] (`InvalidData`, which a reader logs:
/// the peer is broken and the socket is dropped).
pub async fn read_frame<H: FrameHead>(rd: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<(H, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 64];
    let head = &mut head[..H::LEN];
    rd.read_exact(head).await?;
    let h = H::parse(head).expect("a header of its own length");
    let len = h.body_len() as usize;
    if len > MAX_FRAME {
        let why = format!("a frame of {len} bytes (at most {MAX_FRAME})");
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    let mut data = vec![0u8; len];
    rd.read_exact(&mut data).await?;
    Ok((h, data))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn frames_are_read_whole_and_oversized_ones_end_the_stream() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let h = RecordHeader { conn: 7, seq: 2, len: 5, kind: RECORD_HEAD, ..Default::default() };
        a.write_all(&h.to_bytes()).await.unwrap();
        a.write_all(b"hello").await.unwrap();
        let big = RecordHeader { len: MAX_FRAME as u32 + 1, ..h };
        a.write_all(&big.to_bytes()).await.unwrap();
        let (got, data) = read_frame::<RecordHeader>(&mut b).await.unwrap();
        assert_eq!((got.conn, got.seq, &data[..]), (7, 2, &b"hello"[..]));
        let e = read_frame::<RecordHeader>(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        drop(a);
        let e = read_frame::<FrameHeader>(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
