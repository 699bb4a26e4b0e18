//! The operator's surface of a running instance: the root-only control
//! socket (commands, inspection views as JSON), the metrics endpoint, and
//! the CLI side that talks to them and renders tables.

pub mod cli;
pub mod control;
mod inspect;
pub mod metrics;
mod table;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};

use crate::{bpf::Attached, bpf::Counters, conn::LocalAnswers, deliver::Conns, pool::Registry};

/// What the control socket and the metrics endpoint report and act on.
pub struct Context {
    pub instance: String,
    pub listen: SocketAddr,
    /// When it started serving.
    pub started: Instant,
    pub pin_dir: PathBuf,
    /// The programs and where each is attached.
    pub attached: Vec<Attached>,
    pub pools: Arc<Registry>,
    pub counters: Arc<Counters>,
    pub conns: Arc<Conns>,
    pub local: Arc<LocalAnswers>,
    pub timeouts: Arc<crate::conn::Timeouts>,
}
