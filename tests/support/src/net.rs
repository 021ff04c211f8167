//! A TCP proxy a test puts between walcast and a server to cut the
//! network path the two ways it fails in production: with a reset
//! (connections closed: a firewall rejecting, a NAT entry dropped with an
//! RST) and silently (a cable pulled, a security group changed: bytes are
//! no longer delivered in either direction and nobody is told). The second
//! is the one a client only notices by its own timeouts.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow both ways.
    Open,
    /// Bytes are held back both ways, connections stay open and new ones
    /// are accepted but get no answer (a silent cut).
    Blackhole,
}

/// A proxy on a free loopback port forwarding to `127.0.0.1:upstream`.
/// Dropped with the test.
pub struct TcpProxy {
    pub port: u16,
    path: watch::Sender<Link>,
    /// Bumped to close every open connection (a reset cut).
    generation: watch::Sender<u64>,
    connections: Arc<Mutex<u64>>,
}

impl TcpProxy {
    pub async fn start(upstream: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (path, path_rx) = watch::channel(Link::Open);
        let (generation, gen_rx) = watch::channel(0u64);
        let connections = Arc::new(Mutex::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                let path = path_rx.clone();
                let gen = gen_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    relay(client, server, path, gen).await;
                });
            }
        });
        TcpProxy {
            port,
            path,
            generation,
            connections,
        }
    }

    /// Closes every open connection (both sides see it at once).
    pub fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops or resumes delivering bytes (see [`Link`]).
    pub fn set(&self, p: Link) {
        self.path.send_replace(p);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        *self.connections.lock().unwrap()
    }
}

/// Copies both ways until either side closes or the generation changes;
/// while the path is a blackhole, nothing is read (so nothing is
/// delivered, and the kernel's buffers fill as on a dead link).
async fn relay(
    client: TcpStream,
    server: TcpStream,
    path: watch::Receiver<Link>,
    mut gen: watch::Receiver<u64>,
) {
    let start = *gen.borrow_and_update();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, path.clone());
    let down = pump(sr, cw, path);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = async { while gen.changed().await.is_ok() && *gen.borrow() == start {} } => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut path: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while *path.borrow_and_update() == Link::Blackhole {
            if path.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Stop reading at once when the path goes dark.
            _ = path.changed() => continue,
        };
        // Bytes read just before the cut are held until it heals.
        while *path.borrow_and_update() == Link::Blackhole {
            if path.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
