//! The connection task's own socket helpers (what it asks the kernel
//! about a TCP socket is in `crate::tcp`).

/// A duplicate of the connection's socket to pass to a worker (the
/// original stays with this task).
pub(super) fn dup_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    fd.try_clone_to_owned().map_err(|e| tracing::warn!("dup of a client socket: {e}")).ok()
}
