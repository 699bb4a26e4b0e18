//! Human tables for the inspection commands (`dispatcher status`, `pools`,
//! `routes`, `queues`), from the control socket's JSON.

use serde_json::Value;

/// Renders the JSON answer of control command `what`.
pub fn render(what: &str, v: &Value) -> String {
    match what {
        "status" => status(v),
        "pools" => {
            grid(
                &[
                    "POOL",
                    "STATE",
                    "MODE",
                    "SLOT",
                    "PID",
                    "UPTIME",
                    "QUEUED",
                    "STARTED",
                    "CRASHES",
                    "KERNEL REQS",
                    "SLOW REQS",
                ],
                rows(v).iter().flat_map(|p| {
                    let slots = p["slots"].as_array().cloned().unwrap_or_default();
                    slots.into_iter().map(move |s| {
                        vec![
                            text(&p["name"]),
                            text(&p["state"]),
                            text(&p["start_mode"]),
                            text(&s["slot"]),
                            text(&s["pid"]),
                            secs(&s["uptime_secs"]),
                            text(&s["queued_bytes"]),
                            text(&s["workers_started"]),
                            text(&s["crashes"]),
                            text(&p["requests"]["kernel"]),
                            text(&p["requests"]["slow_path"]),
                        ]
                    })
                }),
            ) + &rows(v)
                .iter()
                .filter_map(|p| {
                    p["stopped_because"].as_str().map(|w| format!("pool {} stopped: {w}\n", text(&p["name"])))
                })
                .collect::<String>()
        }
        "routes" => grid(
            &["#", "HOST", "PREFIX", "POOL"],
            rows(v)
                .iter()
                .enumerate()
                .map(|(i, r)| vec![(i + 1).to_string(), text(&r["host"]), text(&r["prefix"]), text(&r["pool"])]),
        ),
        _ => grid(
            &["POOL", "SLOT", "QUEUED BYTES", "WORKER"],
            rows(v)
                .iter()
                .map(|q| vec![text(&q["pool"]), text(&q["slot"]), text(&q["queued_bytes"]), text(&q["worker"])]),
        ),
    }
}

fn rows(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn secs(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |s| format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60))
}

fn status(v: &Value) -> String {
    let mut out = format!(
        "instance {}  pid {}  listening on {}  up {}  pools {}  connections {}\npins {}\n",
        text(&v["instance"]),
        text(&v["pid"]),
        text(&v["listen"]),
        secs(&v["uptime_secs"]),
        text(&v["pools"]),
        text(&v["connections"]),
        text(&v["pins"])
    );
    out += &grid(
        &["PROGRAM", "TYPE", "ATTACHED TO"],
        rows(&v["programs"]).iter().map(|p| vec![text(&p["name"]), text(&p["type"]), text(&p["attached"])]),
    );
    out
}

/// Left-aligned columns, two spaces apart.
fn grid(head: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(head.iter().map(|h| h.to_string()).collect()).chain(rows).collect();
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}
