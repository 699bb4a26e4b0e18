//! An unchanged axum app (examples/apps/axum) in a pool, through
//! `worker::serve`: its JSON API and form through the kernel path (the
//! counters say so), a streamed response chunked to HTTP/1.1 and
//! close-delimited to HTTP/1.0, trailers, a large upload streamed to the
//! handler with the worker's memory bounded, a chunked upload, a slow
//! reader of a streamed response, and `Date` on every answer.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use tests::{checksum, peak_kib, Client, Dispatcher, PoolDef};

/// Bytes of the large upload: far more than the worker may hold.
const UPLOAD: u64 = 256 << 20;
/// Bytes of the chunked upload.
const CHUNKED_UPLOAD: u64 = 40 << 20;
/// How much the worker's peak resident memory may grow while it takes the
/// upload or streams to a slow reader (both move tens of MiB; the windows
/// are 1 MiB and 256 KiB).
const WORKER_PEAK_KIB: u64 = 24 << 10;

fn start() -> Option<Dispatcher> {
    Dispatcher::start_if_privileged(
        &[PoolDef { name: "app", routes: &["*/"], args: &[], extra: "", command: Some("axum-example") }],
        "[limits]\nmax_body = 4294967296\n",
    )
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output().expect("running curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads a whole HTTP/1.x response until the server closes or the body
/// ends, and splits head from body; chunked bodies are returned raw.
fn read_until_close(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let at = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head") + 4;
    (String::from_utf8_lossy(&all[..at]).into_owned(), all[at..].to_vec())
}

/// Decodes a chunked body: (data, trailer lines).
fn dechunk(mut b: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut data = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            let rest = String::from_utf8_lossy(b).into_owned();
            assert!(rest.ends_with("\r\n"), "trailer section ends with CRLF: {rest:?}");
            let trailers = rest.split("\r\n").filter(|l| !l.is_empty()).map(str::to_string).collect();
            return (data, trailers);
        }
        data.extend_from_slice(&b[..size]);
        assert_eq!(&b[size..size + 2], b"\r\n");
        b = &b[size + 2..];
    }
}

#[test]
fn an_axum_app_serves_its_api_form_and_streams_through_a_pool() {
    let Some(d) = start() else { return };
    let mut c = d.connect();

    // The JSON API, over one keep-alive connection (the kernel path).
    let body = r#"{"name":"tea","price_cents":350}"#;
    c.send(
        format!(
            "POST /api/items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let item: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((item["id"].as_u64(), item["name"].as_str()), (Some(1), Some("tea")), "{item}");
    let date = r.header("date").expect("Date on the app's answer");
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    let r = c.get("x", "/api/items/1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["price_cents"], 350);
    let r = c.get("x", "/api/items");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&r.body).unwrap().as_array().map(Vec::len), Some(1));
    let r = c.get("x", "/api/items/99");
    assert_eq!((r.status, r.body.len()), (404, 0), "{r:?}");
    // The client's address, through axum's `ConnectInfo`: from the kernel's
    // head record, and from the slow path's (a chunked request).
    let me = c.stream.local_addr().unwrap().to_string();
    let r = c.get("x", "/whoami");
    assert_eq!((r.status, String::from_utf8_lossy(&r.body).trim()), (200, me.as_str()), "{r:?}");
    let mut slow = d.connect();
    slow.send(b"GET /whoami HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    let r = slow.read_response();
    let me = slow.stream.local_addr().unwrap().to_string();
    assert_eq!((r.status, String::from_utf8_lossy(&r.body).trim()), (200, me.as_str()), "{r:?}");
    // An unknown route is the app's 404 (axum's), not the dispatcher's.
    let r = c.get("x", "/nowhere");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.header("date").is_some());
    // HEAD: the length of what GET would send, no body.
    let index_len = c.get("x", "/").body.len();
    c.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut head = [0u8; 512];
    std::thread::sleep(Duration::from_millis(200));
    let n = c.stream.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\n"), "{text}");
    assert!(text.to_ascii_lowercase().contains(&format!("content-length: {index_len}\r\n")), "{text}");
    let kernel = d.pool_stat("app", "fast_requests");
    assert!(kernel >= 7, "the app's requests came through the kernel path: {}", d.stats());

    // A form, with curl.
    let out = curl(&["-d", "name=Ada&email=ada@example.org", &format!("http://127.0.0.1:{}/form", d.port)]);
    assert_eq!(out, "welcome, Ada <ada@example.org>\n");

    // A streamed response: chunked to HTTP/1.1...
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /stream?lines=4&delay_ms=30 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let (head, body) = read_until_close(&mut s);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("content-length"), "{head}");
    let (data, trailers) = dechunk(&body);
    assert_eq!(String::from_utf8(data).unwrap(), "line 0\nline 1\nline 2\nline 3\n");
    assert!(trailers.is_empty());
    // ...and close-delimited to HTTP/1.0.
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /stream?lines=3&delay_ms=10 HTTP/1.0\r\n\r\n").unwrap();
    let (head, body) = read_until_close(&mut s);
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    assert!(head.contains("Connection: close\r\n"), "{head}");
    assert_eq!(String::from_utf8(body).unwrap(), "line 0\nline 1\nline 2\n");
    // curl reads the stream as it comes.
    assert_eq!(
        curl(&["-N", &format!("http://127.0.0.1:{}/stream?lines=3&delay_ms=0", d.port)]),
        "line 0\nline 1\nline 2\n"
    );

    // Trailers pass.
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n").unwrap();
    let (head, body) = read_until_close(&mut s);
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked\r\n"), "{head}");
    let (data, trailers) = dechunk(&body);
    assert_eq!(data, b"part one\npart two\n");
    assert_eq!(trailers, vec![format!("x-checksum: {}", checksum(b"part one\npart two\n"))]);

    // The keep-alive connection still works after all that.
    assert_eq!(c.get("x", "/api/items/1").status, 200);
}

#[test]
fn a_large_upload_streams_to_the_handler_with_bounded_memory() {
    let Some(d) = start() else { return };
    // Wake the worker, learn its pid.
    let mut c = d.connect();
    assert_eq!(c.get("x", "/").status, 200);
    let workers = d.workers();
    assert_eq!(workers.len(), 1, "one worker: {workers:?}");
    let before = peak_kib(workers[0]);

    // A raw client sends UPLOAD bytes with a Content-Length, generated as
    // it goes, while a second thread reads the answer.
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 253) as u8).collect();
        let mut h: u64 = 0xcbf29ce484222325;
        for _ in 0..UPLOAD >> 20 {
            w.write_all(&block).unwrap();
            for &x in &block {
                h = (h ^ x as u64).wrapping_mul(0x100000001b3);
            }
        }
        h
    });
    let (head, body) = read_until_close(&mut s);
    let want = writer.join().unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(v["bytes"].as_u64(), Some(UPLOAD), "{v}");
    assert_eq!(v["fnv1a64"].as_str(), Some(want.to_string().as_str()), "{v}");
    let peak = peak_kib(workers[0]);
    assert!(
        peak < before + WORKER_PEAK_KIB,
        "the worker's peak memory grew from {before} KiB to {peak} KiB over a {} MiB upload",
        UPLOAD >> 20
    );
    let dpeak = peak_kib(d.pid());
    assert!(dpeak < 256 << 10, "the dispatcher's peak memory is {dpeak} KiB after a {} MiB upload", UPLOAD >> 20);

    // curl uploading a file (PUT with its Content-Length), as the README
    // shows.
    let file = tests::TempDir::new(&format!("axum-upload{}", std::process::id()));
    let path = file.path.join("zeros");
    std::fs::File::create(&path).unwrap().set_len(32 << 20).unwrap();
    let url = format!("http://127.0.0.1:{}/upload", d.port);
    let out = curl(&["-T", &path.display().to_string(), &url]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["bytes"].as_u64(), Some(32 << 20), "{v}");
    assert_eq!(v["fnv1a64"].as_str(), Some(checksum(&vec![0u8; 32 << 20]).to_string().as_str()), "{v}");

    // A chunked upload streams too (`curl -T -` sends one): neither the
    // dispatcher nor the worker holds it.
    let dispatcher_before = peak_kib(d.pid());
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let block = vec![7u8; 1 << 20];
        for _ in 0..CHUNKED_UPLOAD >> 20 {
            w.write_all(format!("{:x}\r\n", block.len()).as_bytes()).unwrap();
            w.write_all(&block).unwrap();
            w.write_all(b"\r\n").unwrap();
        }
        w.write_all(b"0\r\n\r\n").unwrap();
    });
    let (head, body) = read_until_close(&mut s);
    let sent = writer.join();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}{}", String::from_utf8_lossy(&body));
    assert!(sent.is_ok(), "the whole chunked body was sent");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bytes"].as_u64(), Some(CHUNKED_UPLOAD), "{v}");
    assert_eq!(v["fnv1a64"].as_str(), Some(checksum(&vec![7u8; CHUNKED_UPLOAD as usize]).to_string().as_str()));
    let (wpeak, dpeak) = (peak_kib(workers[0]), peak_kib(d.pid()));
    assert!(wpeak < before + WORKER_PEAK_KIB, "worker peak {before} → {wpeak} KiB over a chunked upload");
    assert!(
        dpeak < dispatcher_before + (24 << 10),
        "dispatcher peak {dispatcher_before} → {dpeak} KiB over a chunked upload"
    );

    // A small chunked upload, with curl.
    let out = curl(&["-H", "Transfer-Encoding: chunked", "--data-binary", "hello, chunks", &url]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["bytes"].as_u64(), v["fnv1a64"].as_str()),
        (Some(13), Some(checksum(b"hello, chunks").to_string().as_str()))
    );
    assert_eq!(v["trailers"], serde_json::json!({}), "{v}");

    // Trailer fields of a chunked upload reach the handler as trailers.
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nX-Sum: 99\r\nX-Note: a b\r\n\r\n",
    )
    .unwrap();
    let (head, body) = read_until_close(&mut s);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bytes"].as_u64(), Some(5), "{v}");
    assert_eq!(v["trailers"], serde_json::json!({ "x-sum": "99", "x-note": "a b" }), "{v}");
}

#[test]
fn a_slow_reader_of_a_stream_holds_the_worker_to_its_window() {
    let Some(d) = start() else { return };
    let mut c = Client::connect(d.port);
    assert_eq!(c.get("x", "/").status, 200);
    let workers = d.workers();
    let before = peak_kib(workers[0]);
    // 3,000,000 lines (about 38 MB, far more than the sockets buffer),
    // produced as fast as the app can, read slowly: the stream waits for
    // the client instead of piling up in the worker.
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /stream?lines=3000000&delay_ms=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut got = 0usize;
    let mut buf = [0u8; 4096];
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        got += s.read(&mut buf).unwrap();
    }
    assert!(got > 0);
    let peak = peak_kib(workers[0]);
    assert!(peak < before + WORKER_PEAK_KIB, "worker peak {before} → {peak} KiB while a client reads slowly");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    got += rest.len();
    assert!(rest.ends_with(b"line 2999999\n\r\n0\r\n\r\n"), "the whole stream arrives once the client reads");
    assert!(got > 30_000_000, "{got} bytes");
}

#[test]
fn a_chunked_upload_past_max_body_gets_413_mid_stream() {
    let Some(d) = Dispatcher::start_if_privileged(
        &[PoolDef { name: "app", routes: &["*/"], args: &[], extra: "", command: Some("axum-example") }],
        "[limits]\nmax_body = 100000\n",
    ) else {
        return;
    };
    let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The head and the first 60,000 bytes go to the app before the body
    // is known to be too large.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 60_000, "y".repeat(60_000));
    s.write_all(chunk.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = s.write_all(chunk.as_bytes());
    let (head, _) = read_until_close(&mut s);
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    // The app and the dispatcher go on.
    let mut c = d.connect();
    assert_eq!(c.get("x", "/api/items").status, 200);
}
