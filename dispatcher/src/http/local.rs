//! The answers the dispatcher writes itself: errors of the slow path, a
//! full queue, a stopped pool, time-outs, a dead worker's requests.

/// A response the dispatcher itself sends (errors).
pub fn local_response(status: u16, why: &str, close: bool, retry_after: bool) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{status} {reason}: {why}\n");
    let date = worker::date::http_date();
    let date = std::str::from_utf8(&date).unwrap_or_default();
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nDate: {date}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    );
    if retry_after {
        r.push_str("Retry-After: 1\r\n");
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.push_str(&body);
    r.into_bytes()
}
