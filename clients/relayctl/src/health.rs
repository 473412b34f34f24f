//! `relayctl health`: GET `/livez` and `/readyz` of the relay's admin listener with a minimal
//! HTTP/1.1 client (the admin listener is plain HTTP on loopback; nothing more is needed).

use anyhow::{Context, bail};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read.
const MAX_RESPONSE: u64 = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Admin base URL, e.g. http://127.0.0.1:7702
    #[arg(long)]
    admin: String,
    /// Seconds to wait for each probe.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

/// `http://host:port[/prefix]` split into the address and the path prefix.
#[derive(Debug, PartialEq, Eq)]
struct AdminUrl {
    authority: String,
    prefix: String,
}

fn parse_admin_url(url: &str) -> anyhow::Result<AdminUrl> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => bail!("{scheme}:// is not supported: the admin listener is http://"),
        None => url,
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        bail!("no host in {url:?}");
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok(AdminUrl {
        authority,
        prefix: path.trim_end_matches('/').to_string(),
    })
}

/// A parsed HTTP response.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: String,
    body: String,
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response without a header end")?;
    let head = std::str::from_utf8(&raw[..split]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        reason,
        body: String::from_utf8_lossy(&body).trim().to_string(),
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).context("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).context("truncated chunk")?;
    }
}

async fn get(url: &AdminUrl, path: &str) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect(&url.authority)
        .await
        .with_context(|| format!("connecting to {}", url.authority))?;
    let request = format!(
        "GET {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: relayctl\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.prefix, url.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw).await?;
    parse_response(&raw)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = parse_admin_url(&args.admin)?;
    let mut healthy = true;
    for probe in ["/livez", "/readyz"] {
        let result = tokio::time::timeout(Duration::from_secs(args.timeout), get(&url, probe))
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))
            .and_then(|r| r);
        match result {
            Ok(r) => {
                healthy &= (200..300).contains(&r.status);
                let body = if r.body.is_empty() {
                    String::new()
                } else {
                    format!(" {}", r.body)
                };
                println!("{}: {} {}{body}", &probe[1..], r.status, r.reason);
            }
            Err(e) => {
                healthy = false;
                println!("{}: error: {e:#}", &probe[1..]);
            }
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn admin_urls() {
        assert_eq!(
            parse_admin_url("http://127.0.0.1:7702").unwrap(),
            AdminUrl {
                authority: "127.0.0.1:7702".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse_admin_url("localhost:9/admin/").unwrap(),
            AdminUrl {
                authority: "localhost:9".into(),
                prefix: "/admin".into()
            }
        );
        assert_eq!(parse_admin_url("http://h").unwrap().authority, "h:80");
        assert!(parse_admin_url("https://h:1").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\ndraining",
        )
        .unwrap();
        assert_eq!(
            (r.status, r.reason.as_str(), r.body.as_str()),
            (503, "Service Unavailable", "draining")
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=1\r\n!!!\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "ok!!!");
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[tokio::test]
    async fn probes_a_server_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split(' ').nth(1).unwrap().to_string();
                let body = if path.ends_with("readyz") {
                    "not ready"
                } else {
                    "ok"
                };
                let status = if path.ends_with("readyz") {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                paths.push(path);
            }
            paths
        });
        let url = parse_admin_url(&format!("http://{addr}")).unwrap();
        assert_eq!(get(&url, "/livez").await.unwrap().status, 200);
        let ready = get(&url, "/readyz").await.unwrap();
        assert_eq!((ready.status, ready.body.as_str()), (503, "not ready"));
        assert_eq!(server.await.unwrap(), vec!["/livez", "/readyz"]);
    }
}
