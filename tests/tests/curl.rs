//! The demo configuration's behaviour, seen through curl, and the
//! inspection story (stats, bpftool, clean-up).

use std::process::Command;

use tests::{privileged, Dispatcher, PoolDef, TempDir};

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("running curl (apt-get install curl)");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn curl_gets_echo_and_static_pools() {
    if !privileged() {
        return;
    }
    let site = TempDir::site(&format!("site{}", std::process::id()), &[("index.html", "<h1>hello from static</h1>\n")]);
    let dir = site.path.display().to_string();
    let d = Dispatcher::start(
        &[PoolDef::echo("echo", &["*/echo"]), PoolDef::worker("static", &["*/"], &["--pool-header", "static", &dir])],
        "",
    );
    let base = format!("http://127.0.0.1:{}", d.port);
    let out = curl(&["-i", &format!("{base}/echo/hi")]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-dispatcher-pool: echo"), "{out}");
    assert!(out.contains("GET /echo/hi HTTP/1.1"), "{out}");
    let out = curl(&["-i", &format!("{base}/")]);
    assert!(out.to_ascii_lowercase().contains("x-dispatcher-pool: static"), "{out}");
    assert!(out.contains("hello from static"), "{out}");
    let out = curl(&["-i", &format!("{base}/missing.txt")]);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");

    // A POST body through curl.
    let out = curl(&["--data-binary", "payload-123", &format!("{base}/echo/post")]);
    assert!(out.ends_with("payload-123"), "{out}");
}

#[test]
fn maps_are_inspectable_and_removed_on_exit() {
    if !privileged() {
        return;
    }
    let mut d = Dispatcher::start(&[PoolDef::echo("e", &["*/"])], "");
    let pins = d.pin_dir();
    assert_eq!(d.connect().get("x", "/").status, 200);
    let bpftool = which("bpftool");
    if let Some(bpftool) = bpftool {
        let out = Command::new(&bpftool).args(["map", "show"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for name in ["routes", "conn_state", "pool_stats", "handoffs"] {
            assert!(text.contains(&format!("name {name} ")), "bpftool map show lacks {name}:\n{text}");
        }
        let out = Command::new(&bpftool).args(["map", "dump", "pinned"]).arg(pins.join("routes")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("pool"), "route dump shows no pool field");
        let out = Command::new(&bpftool).args(["map", "dump", "pinned"]).arg(pins.join("pool_stats")).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("fast_requests"));
    } else if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("bpftool is not installed (apt-get install bpftool)");
    }
    assert!(pins.join("routes").exists());
    assert!(d.stop(), "dispatcher did not exit cleanly on SIGTERM:\n{}", d.log());
    assert!(!pins.exists(), "pins left behind in {}", pins.display());
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([std::path::PathBuf::from("/usr/sbin"), std::path::PathBuf::from("/sbin")])
        .map(|d| d.join(cmd))
        .find(|p| p.exists())
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let instance = format!("failstart{}", std::process::id());
    let dir = tests::TempDir::new(&instance);
    let cfg = dir.path.join("bad.toml");
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:{}\"\ninstance = \"{instance}\"\n[[pool]]\nname = \"p\"\nroutes = [\"*/\"]\ncommand = \"no-such-worker-command\"\n", tests::free_port()),
    )
    .unwrap();
    let out = Command::new(tests::bin_dir().join("dispatcher")).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-worker-command"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pins = std::path::Path::new("/sys/fs/bpf").join(&instance);
    let run = std::path::Path::new("/run/dispatcher").join(&instance);
    assert!(!pins.exists(), "pins left at {}", pins.display());
    assert!(!run.exists(), "run directory left at {}", run.display());
}
