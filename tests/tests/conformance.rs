//! The conformance suite (`tests::conformance`, RFC 9112/9110 MUSTs)
//! against the dispatcher serving the demo's echo pool: every case passes.
//! `cargo xtask bench` runs the same suite against nginx beside it.

use tests::{Dispatcher, PoolDef};

#[test]
fn the_dispatcher_passes_the_conformance_suite() {
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::echo("root", &["*/"])], "") else { return };
    let results = tests::conformance::run_all(d.port);
    let table = tests::conformance::table(&[("dispatcher", &results)]);
    eprintln!("{table}");
    let failed: Vec<&str> = results.iter().filter(|r| r.1.is_err()).map(|r| r.0.name).collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{table}");
}
