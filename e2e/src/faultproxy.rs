//! A fault-injecting TCP proxy for the chaos tests: it listens on a loopback port and
//! forwards every connection to a target, and the test switches what the "network"
//! does at run time through the [`FaultProxy`] handle:
//!
//! - [`Mode::Pass`]: bytes go through as they come.
//! - [`Mode::Cut`]: new connections are reset at once and every open one is reset
//!   (`SO_LINGER` 0, so the peers see a RST, not a clean close).
//! - [`Mode::BlackHole`]: connections are accepted and kept, but nothing is forwarded
//!   in either direction (new ones do not reach the target); bytes already read wait.
//!   Back in `Pass`, held connections go on where they stopped, as TCP does after a
//!   partition that heals before its retransmissions give up.
//! - [`FaultProxy::strand`]: the connections open now are black-holed for good, whatever
//!   the mode (a peer that vanished without a RST: a crashed host, a NAT or load
//!   balancer that dropped its state); later connections follow the mode. Only a
//!   client that notices a dead connection by itself (timeouts, keepalive pings) and
//!   reconnects gets through again.
//! - [`Mode::Delay`]: every chunk arrives `base ± jitter` after it was read (uniform,
//!   from a seeded generator per connection and direction), in order.
//! - [`Mode::Throttle`]: at most `bytes_per_sec` per connection and direction.
//!
//! Nothing read from the network can make it panic: every error ends that connection.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to the traffic (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    BlackHole,
    Delay { base: Duration, jitter: Duration },
    Throttle { bytes_per_sec: u64 },
}

#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by every switch to `Cut` (and by dropping the proxy): a connection that
    /// sees it change is reset, however short the cut was.
    cuts: u64,
    /// Bumped by [`FaultProxy::strand`]: a connection that sees it change forwards
    /// nothing more.
    strands: u64,
}

impl State {
    /// Whether a connection opened at (`cuts`, `strands`) must hold its bytes now.
    fn holds(&self, strands: u64) -> bool {
        self.mode == Mode::BlackHole || self.strands != strands
    }
}

/// Counters, for tests that want to know traffic went through the proxy.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    bytes: AtomicU64,
}

/// A running proxy; it stops (resetting its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: watch::Sender<State>,
    stats: Arc<Stats>,
    accept: tokio::task::JoinHandle<()>,
}

/// Largest chunk read at once (smaller under a throttle, so it stays smooth).
const CHUNK: usize = 16 * 1024;

impl FaultProxy {
    /// Listen on a free loopback port and forward to `target`, in [`Mode::Pass`].
    /// `seed` drives the jitter of [`Mode::Delay`].
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, rx) = watch::channel(State { mode: Mode::Pass, cuts: 0, strands: 0 });
        let stats = Arc::new(Stats::default());
        let accept = tokio::spawn(accept_loop(listener, target, rx, stats.clone(), seed));
        Ok(FaultProxy { addr, target, state, stats, accept })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Switch the mode; applies to open connections at once.
    pub fn set(&self, mode: Mode) {
        self.state.send_modify(|s| {
            if mode == Mode::Cut {
                s.cuts += 1;
            }
            s.mode = mode;
        });
    }

    /// Black-hole the connections open now for good (see the module docs).
    pub fn strand(&self) {
        self.state.send_modify(|s| s.strands += 1);
    }

    pub fn mode(&self) -> Mode {
        self.state.borrow().mode
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.stats.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set(Mode::Cut);
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, rx: watch::Receiver<State>, stats: Arc<Stats>, seed: u64) {
    let mut n = 0u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors and the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        n += 1;
        let _ = client.set_nodelay(true);
        if rx.borrow().mode == Mode::Cut {
            reset(client);
            continue;
        }
        tokio::spawn(connection(client, target, rx.clone(), stats.clone(), seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))));
    }
}

/// Close with a RST.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn connection(client: TcpStream, target: SocketAddr, mut rx: watch::Receiver<State>, stats: Arc<Stats>, seed: u64) {
    let (cuts, strands) = {
        let s = rx.borrow();
        (s.cuts, s.strands)
    };
    // A black hole lets nothing reach the target, not even the connection.
    let ok = rx.wait_for(|s| s.cuts != cuts || !s.holds(strands)).await.map(|s| s.cuts == cuts).unwrap_or(false);
    if !ok {
        reset(client);
        return;
    }
    let upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => {
            reset(client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = direction(cr, uw, rx.clone(), (cuts, strands), stats.clone(), seed);
    let down = direction(ur, cw, rx, (cuts, strands), stats, seed ^ 0x5555_5555_5555_5555);
    tokio::join!(up, down);
}

/// One direction: a reader that stamps each chunk with the time it is due, and a writer
/// that sends it then; both stop at a cut, the writer resetting its socket.
async fn direction(mut r: OwnedReadHalf, w: OwnedWriteHalf, rx: watch::Receiver<State>, (cuts, strands): (u64, u64), stats: Arc<Stats>, seed: u64) {
    let (tx, queue) = mpsc::channel::<(Vec<u8>, Instant)>(256);
    let mut rrx = rx.clone();
    let reader = async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let st = match rrx.wait_for(|s| s.cuts != cuts || !s.holds(strands)).await {
                Ok(s) => *s,
                Err(_) => return,
            };
            if st.cuts != cuts {
                return;
            }
            let max = match st.mode {
                Mode::Throttle { bytes_per_sec } => (bytes_per_sec as usize / 10).clamp(1, CHUNK),
                _ => CHUNK,
            };
            let n = tokio::select! {
                r = r.read(&mut buf[..max]) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = rrx.wait_for(|s| s.cuts != cuts) => return,
            };
            let mode = rrx.borrow().mode;
            let due = match mode {
                Mode::Delay { base, jitter } => {
                    let j = jitter.as_micros() as i64;
                    let off = if j > 0 { rng.gen_range(-j..=j) } else { 0 };
                    let us = (base.as_micros() as i64 + off).max(0) as u64;
                    Instant::now() + Duration::from_micros(us)
                }
                _ => Instant::now(),
            };
            if tx.send((buf[..n].to_vec(), due)).await.is_err() {
                return;
            }
        }
    };
    let writer = write_side(w, queue, rx, (cuts, strands), stats);
    tokio::join!(reader, writer);
}

async fn write_side(mut w: OwnedWriteHalf, mut queue: mpsc::Receiver<(Vec<u8>, Instant)>, mut rx: watch::Receiver<State>, (cuts, strands): (u64, u64), stats: Arc<Stats>) {
    let cut = |w: OwnedWriteHalf| {
        let _ = w.as_ref().set_zero_linger();
        // No FIN first: the socket closes with a RST when the reader drops its half.
        w.forget();
    };
    loop {
        let next = tokio::select! {
            biased;
            _ = rx.wait_for(|s| s.cuts != cuts) => return cut(w),
            c = queue.recv() => c,
        };
        let Some((chunk, due)) = next else {
            // The reader stopped: at a cut (it may see it first) a reset, else the source
            // closed and the end is passed on.
            if rx.borrow().cuts != cuts {
                return cut(w);
            }
            let _ = w.shutdown().await;
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = rx.wait_for(|s| s.cuts != cuts) => return cut(w),
        }
        let st = match rx.wait_for(|s| s.cuts != cuts || !s.holds(strands)).await {
            Ok(s) => *s,
            Err(_) => return cut(w),
        };
        if st.cuts != cuts {
            return cut(w);
        }
        if let Mode::Throttle { bytes_per_sec } = st.mode {
            let secs = chunk.len() as f64 / bytes_per_sec.max(1) as f64;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(secs)) => {}
                _ = rx.wait_for(|s| s.cuts != cuts) => return cut(w),
            }
        }
        let written = tokio::select! {
            r = w.write_all(&chunk) => r.is_ok(),
            _ = rx.wait_for(|s| s.cuts != cuts) => return cut(w),
        };
        if !written {
            return cut(w);
        }
        stats.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(data).await?;
        let mut got = vec![0u8; data.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() {
        let p = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&mut s, &data).await.unwrap(), data);
        assert_eq!(p.bytes_forwarded(), 200_000);
        // A clean close reaches the other side.
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn cut_resets_open_and_new_connections_and_pass_restores() {
        let p = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");
        p.set(Mode::Cut);
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("the open connection ends");
        assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{r:?}");
        // New connections are accepted and reset at once.
        let mut s2 = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s2, b"x")).await.expect("not held");
        assert!(r.is_err(), "{r:?}");
        p.set(Mode::Pass);
        let mut s3 = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s3, b"again").await.unwrap(), b"again");
    }

    #[tokio::test]
    async fn a_short_cut_still_resets() {
        let p = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"a").await.unwrap(), b"a");
        p.set(Mode::Cut);
        p.set(Mode::Pass);
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s, b"b")).await.expect("ends");
        assert!(r.is_err(), "{r:?}");
    }

    #[tokio::test]
    async fn black_hole_holds_without_forwarding_then_resumes() {
        let p = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"one").await.unwrap(), b"one");
        p.set(Mode::BlackHole);
        let before = p.bytes_forwarded();
        s.write_all(b"two").await.unwrap();
        let mut buf = [0u8; 3];
        assert!(tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await.is_err(), "an answer came through the black hole");
        // New connections are accepted and held too, and reach nothing.
        let accepted = p.accepted();
        let mut s2 = TcpStream::connect(p.addr()).await.unwrap();
        s2.write_all(b"new").await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), s2.read_exact(&mut buf)).await.is_err());
        assert_eq!(p.accepted(), accepted + 1);
        assert_eq!(p.bytes_forwarded(), before);
        p.set(Mode::Pass);
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"two");
        tokio::time::timeout(Duration::from_secs(5), s2.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"new");
    }

    #[tokio::test]
    async fn stranded_connections_stay_dead_and_new_ones_pass() {
        let p = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"one").await.unwrap(), b"one");
        p.strand();
        let mut buf = [0u8; 3];
        s.write_all(b"two").await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await.is_err(), "a stranded connection forwarded");
        let mut s2 = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s2, b"new").await.unwrap(), b"new");
        // A black hole and back does not revive it either; a cut resets it.
        p.set(Mode::BlackHole);
        p.set(Mode::Pass);
        assert!(tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await.is_err());
        assert_eq!(roundtrip(&mut s2, b"abc").await.unwrap(), b"abc");
        p.set(Mode::Cut);
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("the cut ends it");
        assert!(r.is_err(), "{r:?}");
    }

    #[tokio::test]
    async fn delay_adds_latency_within_the_jitter_in_order() {
        let p = FaultProxy::start(echo().await, 7).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        p.set(Mode::Delay { base: Duration::from_millis(100), jitter: Duration::from_millis(50) });
        let mut rtts = Vec::new();
        for i in 0..5u8 {
            let t = StdInstant::now();
            assert_eq!(roundtrip(&mut s, &[i; 10]).await.unwrap(), vec![i; 10]);
            rtts.push(t.elapsed());
        }
        // Two legs of 50..150 ms each.
        for r in &rtts {
            assert!(*r >= Duration::from_millis(100) && *r < Duration::from_millis(600), "{rtts:?}");
        }
        // Jitter: not all the same (seeded, so this is deterministic up to scheduling).
        let (min, max) = (rtts.iter().min().unwrap(), rtts.iter().max().unwrap());
        assert!(*max - *min > Duration::from_millis(5), "{rtts:?}");
        // Many chunks in flight keep their order and do not add up their delays.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let t = StdInstant::now();
        assert_eq!(roundtrip(&mut s, &data).await.unwrap(), data);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        p.set(Mode::Pass);
        let t = StdInstant::now();
        roundtrip(&mut s, b"fast").await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn throttle_limits_the_rate() {
        let p = FaultProxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        p.set(Mode::Throttle { bytes_per_sec: 100_000 });
        let data = vec![7u8; 50_000];
        let t = StdInstant::now();
        assert_eq!(roundtrip(&mut s, &data).await.unwrap(), data);
        // 50 kB each way at 100 kB/s, the legs overlapping: at least ~0.5 s.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(450) && e < Duration::from_secs(5), "{e:?}");
        p.set(Mode::Pass);
        let t = StdInstant::now();
        assert_eq!(roundtrip(&mut s, &data).await.unwrap(), data);
        assert!(t.elapsed() < Duration::from_millis(300), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn an_unreachable_target_resets_the_client() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let p = FaultProxy::start(target, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("ends");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
}
