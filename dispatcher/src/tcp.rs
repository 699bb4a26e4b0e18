//! What the dispatcher asks the kernel about a TCP socket (for the
//! connection tasks and the splice tasks alike).

/// Bytes written into a TCP socket by anyone since it opened: acknowledged
/// plus still queued, read until no ACK moved them in between.
pub fn socket_written(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
    /// `struct tcp_info` up to `tcpi_bytes_acked` (linux/tcp.h).
    #[repr(C)]
    #[derive(Default)]
    struct TcpInfoHead {
        _u8s: [u8; 8],
        _u32s: [u32; 24],
        _pacing: [u64; 2],
        bytes_acked: u64,
    }
    let outq = || {
        let mut q: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int.
        match unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut q) } {
            0 => Ok(q as u64),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    for _ in 0..8 {
        let before = outq()?;
        let mut info = TcpInfoHead::default();
        let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes of tcp_info.
        if unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info as *mut _ as *mut _, &mut len) }
            != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
            return Err(std::io::Error::other("tcp_info without tcpi_bytes_acked"));
        }
        if outq()? == before {
            return Ok(info.bytes_acked + before);
        }
    }
    Err(std::io::Error::other("the send queue kept moving"))
}

/// The socket's cookie (`SO_COOKIE`): its key in the kernel's maps.
pub fn socket_cookie(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 with its size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, &mut v as *mut u64 as *mut _, &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}
