//! Starting one worker process with its handles at their fixed fd
//! numbers, as the pool's user.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
    process::Stdio,
};

use tokio::process::Command;

use crate::{env, Error, Handles, WorkerSpec, AWAKE_FD, CTL_FD, LEASE_FD, PROGRESS_FD, RING_FD};

struct Ids {
    uid: u32,
    gid: u32,
}

fn lookup_user(name: &str) -> Option<Ids> {
    let u = nix::unistd::User::from_name(name).ok().flatten()?;
    Some(Ids { uid: u.uid.as_raw(), gid: u.gid.as_raw() })
}

/// Starts one worker process with `handles`.
pub fn spawn(spec: &WorkerSpec, handles: Handles) -> Result<tokio::process::Child, Error> {
    let mut ids = match (&spec.user, nix::unistd::geteuid().is_root()) {
        (Some(u), true) => {
            Some(lookup_user(u).ok_or_else(|| Error::NoSuchUser { pool: spec.pool.clone(), user: u.clone() })?)
        }
        _ => None,
    };
    if let (Some(ids), Some(g)) = (ids.as_mut(), &spec.group) {
        let grp = nix::unistd::Group::from_name(g).ok().flatten();
        ids.gid = grp.ok_or_else(|| Error::NoSuchGroup { pool: spec.pool.clone(), group: g.clone() })?.gid.as_raw();
    }
    let mut cmd = Command::new(&spec.command);
    cmd.args(&spec.args)
        .env(env::POOL, &spec.pool)
        .env(env::CTL_FD, CTL_FD.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if handles.ring.is_some() {
        cmd.env(env::RING_FD, RING_FD.to_string());
    } else {
        cmd.env_remove(env::RING_FD);
    }
    for (present, var, fd) in [
        (handles.lease.is_some(), env::LEASE_FD, LEASE_FD),
        (handles.awake.is_some(), env::AWAKE_FD, AWAKE_FD),
        (handles.progress.is_some(), env::PROGRESS_FD, PROGRESS_FD),
    ] {
        if present {
            cmd.env(var, fd.to_string());
        } else {
            cmd.env_remove(var);
        }
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    // (handle, fixed number) pairs; -1: absent. A plain array: nothing
    // may allocate between fork and exec.
    let raw = |f: &Option<OwnedFd>| f.as_ref().map_or(-1, |f| f.as_raw_fd());
    let moves: [(i32, i32); 5] = [
        (raw(&handles.ring), RING_FD),
        (handles.ctl.as_raw_fd(), CTL_FD),
        (raw(&handles.lease), LEASE_FD),
        (raw(&handles.awake), AWAKE_FD),
        (raw(&handles.progress), PROGRESS_FD),
    ];
    let user = spec.user.as_ref().map(|u| CString::new(u.as_str()).unwrap_or_default());
    // SAFETY: only async-signal-safe calls (dup2, fcntl, setgroups,
    // setgid, setuid, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move the handles to their fixed numbers; dup2 clears CLOEXEC.
            // All go to scratch numbers first, so that no dup2 overwrites
            // a handle still to be moved.
            let mut scratch = [-1i32; 5];
            for (i, (fd, _)) in moves.iter().enumerate() {
                if *fd >= 0 {
                    scratch[i] = libc::fcntl(*fd, libc::F_DUPFD, 64);
                    if scratch[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            for (i, (_, target)) in moves.iter().enumerate() {
                if scratch[i] >= 0 {
                    if libc::dup2(scratch[i], *target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(scratch[i]);
                }
            }
            // Its own process group: a Ctrl-C at the terminal reaches the
            // dispatcher, which then stops the workers in order.
            libc::setpgid(0, 0);
            // Die with the dispatcher rather than outlive it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if let (Some(ids), Some(user)) = (&ids, &user) {
                if libc::initgroups(user.as_ptr(), ids.gid) != 0
                    || libc::setgid(ids.gid) != 0
                    || libc::setuid(ids.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        pool: spec.pool.clone(),
        command: spec.command.display().to_string(),
        source,
    })?;
    // The child has its copies; ours close when `handles` drops here.
    drop(handles);
    Ok(child)
}
