//! The pool's ring (a BPF ring buffer the kernel queues framed requests
//! on): opened from its inherited fd, waited on, and drained with each
//! record read straight from ring memory (one copy, into reassembly).

use std::os::fd::{AsRawFd, OwnedFd};

use aya::maps::{Map, MapData, RingBuf};
use dispatcher_ebpf::abi::{RecordHeader, RECORD_HEADER_LEN};
use tokio::io::unix::AsyncFd;

use crate::Error;

/// A worker's ring, registered with the reactor.
pub(crate) struct Ring(AsyncFd<RingBuf<MapData>>);

impl Ring {
    /// The ring whose map fd is `fd`. No BPF privilege is needed to
    /// consume a ring whose fd you were given.
    pub(crate) fn open(fd: OwnedFd) -> Result<Ring, Error> {
        let raw = fd.as_raw_fd();
        let data = MapData::from_fd(fd).map_err(|source| Error::Ring { fd: raw, source })?;
        let rb = RingBuf::try_from(Map::RingBuf(data)).map_err(|source| Error::Ring { fd: raw, source })?;
        // SAFETY: the RingBuf owns the fd for as long as the AsyncFd lives.
        Ok(Ring(unsafe { AsyncFd::register(rb) }.map_err(|e| Error::Control(e.into()))?))
    }

    /// Waits until the kernel signals new records.
    pub(crate) async fn readable(&mut self) -> std::io::Result<()> {
        let mut g = self.0.readable_mut().await?;
        g.clear_ready();
        Ok(())
    }

    /// Hands every record the ring holds to `each` (its bytes, see
    /// [`split`]) until `each` says to stop; true if there were any.
    pub(crate) fn drain(&mut self, mut each: impl FnMut(&[u8]) -> bool) -> bool {
        let rb = self.0.get_mut();
        let mut any = false;
        while let Some(item) = rb.next() {
            any = true;
            let go_on = each(&item);
            drop(item);
            if !go_on {
                break;
            }
        }
        any
    }
}

/// A ring record's header and data (`None`: shorter than a header).
pub(crate) fn split(item: &[u8]) -> Option<(RecordHeader, &[u8])> {
    let hdr = RecordHeader::from_bytes(item)?;
    let end = (RECORD_HEADER_LEN + hdr.len as usize).min(item.len());
    Some((hdr, &item[RECORD_HEADER_LEN..end]))
}
