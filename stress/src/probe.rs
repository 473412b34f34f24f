//! Reading the relay from outside: CPU and memory from /proc, the store's size on disk, and
//! its admin API (`/v1/queues`) over plain HTTP on loopback.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User plus system CPU time of a process, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based, man proc).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Bytes a directory tree occupies on disk (allocated blocks).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// CPU use of a process between two calls, in percent of one core.
pub struct CpuMeter {
    pid: u32,
    ticks_per_s: f64,
    last: Option<(Instant, u64)>,
}

impl CpuMeter {
    /// Starts measuring `pid`.
    pub fn new(pid: u32) -> Self {
        let mut m = Self {
            pid,
            ticks_per_s: clock_ticks(),
            last: None,
        };
        m.last = cpu_ticks(pid).map(|t| (Instant::now(), t));
        m
    }

    /// Percent of one core since the last call (200 = both cores of this machine).
    pub fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        let ticks = cpu_ticks(self.pid)?;
        let pct = self.last.map(|(then, before)| {
            let wall = now.duration_since(then).as_secs_f64();
            if wall <= 0.0 {
                0.0
            } else {
                ticks.saturating_sub(before) as f64 / self.ticks_per_s / wall * 100.0
            }
        });
        self.last = Some((now, ticks));
        pct
    }

    /// Total CPU seconds used so far.
    pub fn total_s(&self) -> Option<f64> {
        cpu_ticks(self.pid).map(|t| t as f64 / self.ticks_per_s)
    }
}

/// Which process listens on a local port: matches the socket's inode in /proc/net/{tcp,udp}
/// against the file descriptors of every process we can read.
pub fn pid_listening_on(port: u16, udp: bool) -> Option<u32> {
    let tables = if udp {
        ["/proc/net/udp", "/proc/net/udp6"]
    } else {
        ["/proc/net/tcp", "/proc/net/tcp6"]
    };
    let mut inodes = Vec::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let Some(p) = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            // TCP: 0A is LISTEN. UDP sockets are all "07" (unconnected).
            let listening = if udp { *state == "07" } else { *state == "0A" };
            if p == port && listening && *inode != "0" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let me = std::process::id();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| Path::new(i) == link)
            {
                return Some(pid);
            }
        }
    }
    None
}

/// One row of `/v1/queues`.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueRow {
    /// Destination peer.
    pub dest: String,
    /// Lane name.
    pub lane: String,
    /// Items durable in the store.
    pub messages: u64,
    /// Their bytes.
    #[serde(default)]
    pub bytes: u64,
    /// Handed out, not acked.
    #[serde(default)]
    pub in_flight: u64,
}

/// GET over HTTP/1.1 on loopback; returns the body of a 200 answer.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "no HTTP header".to_string())?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            return Err(format!("GET {path}: HTTP {status}"));
        }
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        Ok(if chunked {
            dechunk(body)
        } else {
            body.to_string()
        })
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The relay's queues.
pub async fn queues(admin: SocketAddr) -> Result<Vec<QueueRow>, String> {
    let body = http_get(admin, "/v1/queues", Duration::from_secs(2)).await?;
    serde_json::from_str(&body).map_err(|e| format!("/v1/queues: {e}"))
}

/// What can be observed of the relay under test.
#[derive(Debug, Clone, Default)]
pub struct RelayHandle {
    /// Its process, when known.
    pub pid: Option<u32>,
    /// Its admin API.
    pub admin: Option<SocketAddr>,
    /// Its store directory.
    pub store_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
        let mut m = CpuMeter::new(me);
        let _ = (0..200_000u64).map(|x| x.wrapping_mul(x)).sum::<u64>();
        assert!(m.sample().is_some());
    }

    #[test]
    fn disk_bytes_counts_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), vec![1u8; 10_000]).unwrap();
        assert!(disk_bytes(dir.path()) >= 10_000);
    }

    #[test]
    fn finds_the_listener_of_a_port() {
        // Our own listener is skipped (we look for the relay, never ourselves), so nothing
        // else should be on this fresh port.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port, false), None);
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
