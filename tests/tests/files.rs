//! The ready worker's `static` mode as a static server, through the
//! kernel path, with a raw-socket client and curl: validators and 304,
//! ranges (206, 416), a precompressed sibling with `Vary`, a file changed
//! on disk served fresh, a symlink out of the root refused, a file larger
//! than the memory cache, `HEAD`, and `Cache-Control`.

use std::{os::unix::fs::symlink, path::Path, process::Command};

use tests::{checksum, peak_kib, Client, Dispatcher, PoolDef, Response, TempDir};

/// Bigger than the worker's in-memory cache takes (1 MiB).
const BIG: usize = 3 << 20;
/// A cached file large enough to be sent with `sendfile`.
const MID: usize = 600 << 10;
/// A file far larger than a worker may hold.
const HUGE: u64 = 96 << 20;

const CACHE_CONTROL: &str = "public, max-age=60";

fn get(c: &mut Client, path: &str, headers: &[(&str, &str)]) -> Response {
    let extra: String = headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes());
    c.read_response()
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("running curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn site(root: &Path) {
    std::fs::write(root.join("page.html"), "<h1>a page worth compressing, compressing, compressing</h1>\n").unwrap();
    // Made after the page, so it is at least as fresh.
    assert!(Command::new("gzip").args(["-k", "-9"]).arg(root.join("page.html")).status().unwrap().success());
    std::fs::write(root.join("plain.txt"), "0123456789abcdefghij").unwrap();
    std::fs::write(root.join("big.bin"), (0..BIG).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
    symlink("/etc/hostname", root.join("escape.txt")).unwrap();
    std::fs::File::create(root.join("huge.bin")).unwrap().set_len(HUGE).unwrap();
    // Kept in memory with its file open (old enough to be trusted): a
    // leased socket gets it with `sendfile`.
    let mid = std::fs::File::create(root.join("mid.bin")).unwrap();
    std::io::Write::write_all(&mut &mid, &(0..MID).map(|i| (i * 13 % 241) as u8).collect::<Vec<_>>()).unwrap();
    mid.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60)).unwrap();
}

#[test]
fn a_static_pool_serves_validators_ranges_encodings_and_fresh_files() {
    let site_dir = TempDir::new(&format!("files{}", std::process::id()));
    site(&site_dir.path);
    site_dir.make_readable();
    let dir = site_dir.path.display().to_string();
    let args = ["--pool-header", "static", &dir, "--cache-control", CACHE_CONTROL];
    let Some(d) = Dispatcher::start_if_privileged(&[PoolDef::worker("files", &["*/"], &args)], "") else {
        return;
    };
    let mut c = d.connect();

    let r = get(&mut c, "/plain.txt", &[]);
    assert_eq!((r.status, &r.body[..]), (200, &b"0123456789abcdefghij"[..]), "{r:?}");
    let etag = r.header("etag").expect("ETag").to_string();
    let modified = r.header("last-modified").expect("Last-Modified").to_string();
    assert!(httpdate::parse_http_date(&modified).is_ok(), "{modified}");
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("cache-control"), Some(CACHE_CONTROL));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    // Conditional requests.
    let r = get(&mut c, "/plain.txt", &[("If-None-Match", &etag)]);
    assert_eq!((r.status, r.body.len()), (304, 0), "{r:?}");
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.header("content-length"), None, "a 304 claims no length");
    let r = get(&mut c, "/plain.txt", &[("If-None-Match", "\"other\", W/\"x\"")]);
    assert_eq!(r.status, 200);
    let r = get(&mut c, "/plain.txt", &[("If-Modified-Since", &modified)]);
    assert_eq!(r.status, 304, "{r:?}");
    let r = get(&mut c, "/plain.txt", &[("If-Modified-Since", "Sat, 01 Jan 2000 00:00:00 GMT")]);
    assert_eq!(r.status, 200);

    // Ranges.
    let r = get(&mut c, "/plain.txt", &[("Range", "bytes=2-5")]);
    assert_eq!((r.status, &r.body[..]), (206, &b"2345"[..]), "{r:?}");
    assert_eq!(r.header("content-range"), Some("bytes 2-5/20"));
    let r = get(&mut c, "/plain.txt", &[("Range", "bytes=-3")]);
    assert_eq!((r.status, &r.body[..]), (206, &b"hij"[..]));
    let r = get(&mut c, "/plain.txt", &[("Range", "bytes=20-")]);
    assert_eq!(r.status, 416, "{r:?}");
    assert_eq!(r.header("content-range"), Some("bytes */20"));
    let r = get(&mut c, "/plain.txt", &[("Range", "bytes=0-0"), ("If-Range", "\"stale\"")]);
    assert_eq!((r.status, r.body.len()), (200, 20), "a stale If-Range gets the whole file");

    // The precompressed sibling, to a client that takes it.
    let gz = std::fs::read(site_dir.path.join("page.html.gz")).unwrap();
    let r = get(&mut c, "/page.html", &[("Accept-Encoding", "gzip, deflate")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"), "{r:?}");
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
    assert_eq!(r.body, gz);
    let gz_tag = r.header("etag").unwrap().to_string();
    let r = get(&mut c, "/page.html", &[]);
    assert_eq!((r.header("content-encoding"), r.header("vary")), (None, Some("Accept-Encoding")));
    assert_ne!(r.header("etag"), Some(gz_tag.as_str()), "each encoding has its own tag");
    let page = curl(&["--compressed", &format!("http://127.0.0.1:{}/page.html", d.port)]);
    assert!(page.starts_with("<h1>a page worth compressing"), "{page}");

    // Changed on disk: served fresh, with a new tag.
    std::fs::write(site_dir.path.join("plain.txt"), "changed, and longer than before").unwrap();
    let r = get(&mut c, "/plain.txt", &[("If-None-Match", &etag)]);
    assert_eq!((r.status, &r.body[..]), (200, &b"changed, and longer than before"[..]), "{r:?}");
    assert_ne!(r.header("etag"), Some(etag.as_str()));

    // Out of the root through a symlink; a missing file.
    assert_eq!(get(&mut c, "/escape.txt", &[]).status, 403);
    assert_eq!(get(&mut c, "/nothing-here", &[]).status, 404);

    // Larger than the memory cache: read from the file, whole and in part.
    let want: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
    let r = get(&mut c, "/big.bin", &[]);
    assert_eq!((r.status, r.body.len(), checksum(&r.body)), (200, BIG, checksum(&want)));
    let r = get(&mut c, "/big.bin", &[("Range", "bytes=1048576-1048591")]);
    assert_eq!((r.status, &r.body[..]), (206, &want[1 << 20..(1 << 20) + 16]));
    // As a new connection's first response it goes through the dispatcher
    // (read part by part); above, on the leased connection, with sendfile.
    let mut fresh = d.connect();
    let r = get(&mut fresh, "/big.bin", &[]);
    assert_eq!((r.status, r.body.len(), checksum(&r.body)), (200, BIG, checksum(&want)));
    let r = get(&mut fresh, "/big.bin", &[("Range", "bytes=5-1048580")]);
    assert_eq!((r.status, r.body.len(), checksum(&r.body)), (206, 1 << 20, checksum(&want[5..1048581])));
    // A cached file sent from its open file (`sendfile`) on the leased
    // connection, whole and in part, several times over.
    let want: Vec<u8> = (0..MID).map(|i| (i * 13 % 241) as u8).collect();
    for _ in 0..3 {
        let r = get(&mut c, "/mid.bin", &[]);
        assert_eq!((r.status, r.body.len(), checksum(&r.body)), (200, MID, checksum(&want)));
        let r = get(&mut c, "/mid.bin", &[("Range", "bytes=300000-300999")]);
        assert_eq!((r.status, &r.body[..]), (206, &want[300_000..301_000]));
    }
    // A large file is read as it is sent: the worker does not hold it.
    let worker = d.workers()[0];
    let before = peak_kib(worker);
    let r = get(&mut c, "/huge.bin", &[]);
    assert_eq!((r.status, r.body.len()), (200, HUGE as usize));
    assert!(r.body.iter().all(|&b| b == 0));
    let peak = peak_kib(worker);
    assert!(
        peak < before + (24 << 10),
        "the worker's peak memory grew from {before} to {peak} KiB for a {HUGE}-byte file"
    );

    // HEAD: the headers of a GET, no body.
    let head = curl(&["-I", &format!("http://127.0.0.1:{}/plain.txt", d.port)]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-length: 31\r\n"), "{head}");
}
