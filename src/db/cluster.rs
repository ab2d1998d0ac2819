//! A private PostgreSQL cluster run from the installed server binaries, so the
//! service and the tests need no database setup.
//!
//! The postmaster is a child process bound to a supervisor thread that lives
//! as long as the process: when creditd exits, however it exits, the kernel
//! sends the postmaster SIGINT (fast shutdown), so no cluster outlives us.
//! `initdb` refuses to run as root, so as root the cluster runs as the
//! `postgres` system user in a directory that user owns.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// Port number used in the socket name; the socket lives in the data directory.
const SOCKET_PORT: u16 = 5432;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on: what a service needs.
    Durable,
    /// fsync off: throwaway test clusters.
    Throwaway,
}

pub struct PrivateCluster {
    data_dir: PathBuf,
    pid: u32,
    exited: Mutex<Option<mpsc::Receiver<()>>>,
}

struct RunAs {
    uid: u32,
    gid: u32,
}

impl PrivateCluster {
    /// Starts (creating it first if needed) the cluster in `data_dir`.
    pub fn start(data_dir: &Path, durability: Durability) -> anyhow::Result<PrivateCluster> {
        let bin = find_server_binaries()?;
        let run_as = run_as_user()?;
        fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(&data_dir, Some(user.uid), Some(user.gid)).with_context(
                || format!("cannot give {} to the postgres user", data_dir.display()),
            )?;
        }
        if !data_dir.join("PG_VERSION").exists() {
            initdb(&bin, &data_dir, run_as.as_ref(), durability)?;
        }
        let (pid, exited) = spawn_postmaster(&bin, &data_dir, run_as.as_ref(), durability)?;
        let cluster = PrivateCluster {
            data_dir,
            pid,
            exited: Mutex::new(Some(exited)),
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The unix socket clients connect to.
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"))
    }

    /// Connection settings for `dbname` as the cluster's superuser.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.data_dir)
            .port(SOCKET_PORT)
            .user("postgres")
            .dbname(dbname);
        config
    }

    /// Fast shutdown; waits for the postmaster to exit.
    pub fn stop(&self) {
        let receiver = self.exited.lock().ok().and_then(|mut guard| guard.take());
        let Some(exited) = receiver else { return };
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGINT) };
        if exited.recv_timeout(Duration::from_secs(30)).is_err() {
            tracing::warn!(
                pid = self.pid,
                "private PostgreSQL did not stop within 30 s"
            );
        }
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            // Line 8 of postmaster.pid turns to "ready" once connections are accepted.
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let ours = text.lines().next() == Some(self.pid.to_string().as_str());
                if ours && text.lines().nth(7).map(str::trim) == Some("ready") {
                    return Ok(());
                }
            }
            let exited = self
                .exited
                .lock()
                .map_err(|_| anyhow!("cluster state poisoned"))?
                .as_ref()
                .map(|rx| rx.try_recv().is_ok())
                .unwrap_or(true);
            if exited {
                bail!(
                    "private PostgreSQL exited during startup; its log ends with:\n{}",
                    log_tail(&self.data_dir)
                );
            }
            if Instant::now() > deadline {
                bail!("private PostgreSQL not ready after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `initdb`/`postgres` from PATH, else the newest `/usr/lib/postgresql/*/bin`.
fn find_server_binaries() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>());
    let mut installed: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|dir| dir.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    installed.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    installed.reverse();
    on_path
        .chain(installed)
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        .ok_or_else(|| {
            anyhow!(
                "no PostgreSQL server binaries found (initdb and postgres on PATH or under \
                 /usr/lib/postgresql/*/bin): install the PostgreSQL server package \
                 (Debian: apt-get install postgresql) or set CREDITD__DATABASE__URL"
            )
        })
}

/// As root, the cluster runs as the `postgres` system user.
fn run_as_user() -> anyhow::Result<Option<RunAs>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    let entry = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres") && fields.len() > 3)
        .ok_or_else(|| {
            anyhow!(
                "running as root, and initdb refuses root: create the `postgres` system user \
                 (the PostgreSQL server package does) or run creditd as another user"
            )
        })?;
    Ok(Some(RunAs {
        uid: entry[2].parse().context("postgres uid in /etc/passwd")?,
        gid: entry[3].parse().context("postgres gid in /etc/passwd")?,
    }))
}

fn command(program: PathBuf, run_as: Option<&RunAs>) -> Command {
    let mut command = Command::new(program);
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    command.env_remove("PGDATA").env("LC_ALL", "C");
    command
}

fn initdb(
    bin: &Path,
    data_dir: &Path,
    run_as: Option<&RunAs>,
    durability: Durability,
) -> anyhow::Result<()> {
    let mut initdb = command(bin.join("initdb"), run_as);
    initdb.arg("-D").arg(data_dir).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    if durability == Durability::Throwaway {
        initdb.arg("--no-sync");
    }
    let output = initdb
        .stdin(Stdio::null())
        .output()
        .context("cannot run initdb")?;
    if !output.status.success() {
        bail!(
            "initdb failed for {}: {}",
            data_dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
        .context("cannot restrict the data directory")?;
    Ok(())
}

/// Starts the postmaster from a supervisor thread that waits on it; the
/// child gets SIGINT when that thread (that is, this process) dies.
fn spawn_postmaster(
    bin: &Path,
    data_dir: &Path,
    run_as: Option<&RunAs>,
    durability: Durability,
) -> anyhow::Result<(u32, mpsc::Receiver<()>)> {
    let log_path = data_dir.join("postgres.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut postgres = command(bin.join("postgres"), run_as);
    postgres
        .arg("-D")
        .arg(data_dir)
        .arg("-k")
        .arg(data_dir)
        .args(["-p", &SOCKET_PORT.to_string()])
        .args(["-c", "listen_addresses="])
        .args(["-c", "max_connections=300"])
        .args(["-c", "shared_buffers=128MB"]);
    if durability == Durability::Throwaway {
        postgres.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
    }
    postgres
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; it only sets this child's
    // parent-death signal, after the uid change (which would clear it).
    unsafe {
        postgres.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (started_tx, started_rx) = mpsc::channel();
    let (exited_tx, exited_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("postgres-supervisor".into())
        .spawn(move || match postgres.spawn() {
            Ok(mut child) => {
                let _ = started_tx.send(Ok(child.id()));
                let _ = child.wait();
                let _ = exited_tx.send(());
            }
            Err(error) => {
                let _ = started_tx.send(Err(error));
            }
        })
        .context("cannot start the postgres supervisor thread")?;
    let pid = started_rx
        .recv()
        .context("postgres supervisor thread died")?
        .context("cannot start postgres")?;
    Ok((pid, exited_rx))
}

/// Reads the tail of the cluster log, for error messages.
fn log_tail(data_dir: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(data_dir.join("postgres.log")) {
        let _ = file.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(2000);
    text[text.ceil_char_boundary(start)..].to_owned()
}
