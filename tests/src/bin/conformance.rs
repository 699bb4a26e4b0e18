//! `conformance NAME=PORT...`: runs the conformance suite
//! (`tests::conformance`) against each server on loopback and prints one
//! Markdown table, a column per server (`cargo xtask bench` runs it against
//! nginx and the dispatcher side by side).

fn main() {
    let servers: Vec<(String, u16)> = std::env::args()
        .skip(1)
        .map(|a| {
            let (name, port) = a.split_once('=').unwrap_or_else(|| usage(&a));
            (name.to_string(), port.parse().unwrap_or_else(|_| usage(&a)))
        })
        .collect();
    if servers.is_empty() {
        usage("no server");
    }
    let results: Vec<_> = servers.iter().map(|(_, port)| tests::conformance::run_all(*port)).collect();
    let columns: Vec<(&str, &tests::conformance::Verdicts)> =
        servers.iter().zip(&results).map(|((n, _), r)| (n.as_str(), r)).collect();
    print!("{}", tests::conformance::table(&columns));
}

fn usage(what: &str) -> ! {
    eprintln!("conformance: {what}: want NAME=PORT arguments, e.g. `conformance nginx=8081 dispatcher=8080`");
    std::process::exit(2);
}
