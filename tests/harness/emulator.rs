//! The Firestore emulator for tests: one per test binary, started on a free
//! loopback port the first time a test asks for it, and stopped when the test
//! binary exits (a watchdog shell leading the emulator's session ends every
//! process of that session, Java child included, once the test process is gone). Each
//! test uses a fresh project id, so tests never see each other's data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// `host:port` of the running emulator; also exported to this process as
/// `FIRESTORE_EMULATOR_HOST`.
pub fn emulator_host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(start)
}

/// A project id no other test uses.
pub fn fresh_project() -> String {
    format!("test-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

fn start() -> String {
    let gcloud = Command::new("sh").args(["-c", "command -v gcloud"]).output().map(|o| o.status.success());
    assert!(
        matches!(gcloud, Ok(true)),
        "the Firestore emulator is needed by this test and `gcloud` is not installed: install the Google Cloud SDK \
         (https://cloud.google.com/sdk/docs/install), then `gcloud components install cloud-firestore-emulator` \
         (it needs Java 11+)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let host = format!("127.0.0.1:{port}");
    let log: PathBuf = std::env::temp_dir().join(format!("firestore-emulator-{port}.log"));
    // A log left by an earlier emulator on the same port would announce
    // this one as running before it is.
    let _ = std::fs::remove_file(&log);
    let test_pid = std::process::id();
    // The shell leads a new session (setsid). gcloud moves itself and its
    // Java child into a process group of their own, but stays in the session:
    // when this test process ends, the shell ends every process of its session.
    let script = format!(
        "gcloud emulators firestore start --host-port={host} >{log} 2>&1 & \
         while kill -0 {test_pid} 2>/dev/null; do sleep 1; done; pkill -TERM -s $$; kill -TERM 0",
        log = log.display()
    );
    let mut watchdog =
        Command::new("setsid").args(["sh", "-c", &script]).spawn().expect("start the Firestore emulator");
    // Reaped when it exits (after this process), or never: either way no zombie.
    std::thread::spawn(move || watchdog.wait());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Dev App Server is now running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Firestore emulator did not start within 90 s; its output:\n{text}\n\
             (install it with `gcloud components install cloud-firestore-emulator`; it needs Java)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: set once, before any test of this binary reads it (they all
    // come through this function first).
    unsafe { std::env::set_var("FIRESTORE_EMULATOR_HOST", &host) };
    host
}

/// Configuration of a relay replica on `project` (TOML): Firestore metadata
/// and replication, polling every 100 ms.
pub fn replica_config(project: &str) -> String {
    format!(
        "[metadata]\nbackend = \"firestore\"\n[firestore]\nproject_id = \"{project}\"\n\
         [replication]\nenabled = true\npoll_interval_ms = 100\n"
    )
}

/// A TCP proxy in front of the emulator (or any service) that the test can cut (connections
/// refused), stall (connections accepted and never answered: a hung
/// Firestore) and restore, for a running relay.
pub struct Proxy {
    pub addr: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (target, flag, stall, conns) = (target.to_owned(), up.clone(), stalled.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection reset
                }
                let target = target.clone();
                let stall = stall.clone();
                conns.lock().unwrap().push(tokio::spawn(async move {
                    if stall.load(std::sync::atomic::Ordering::SeqCst) {
                        // Held open, never read: every call on it hangs.
                        std::future::pending::<()>().await;
                    }
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    drop(inbound);
                }));
            }
        });
        Self { addr, up, stalled, connections }
    }

    /// Open connections close; new ones are accepted and never answered.
    pub fn stall(&self) {
        self.stalled.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stalled.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}
