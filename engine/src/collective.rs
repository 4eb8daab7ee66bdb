//! Collectives for data-parallel training: the [`Collective`] interface the training
//! loop uses, [`Solo`] for one rank, and [`TcpRing`], a ring over plain TCP between
//! processes (or threads) that every build has.
//!
//! **Reduction order.** [`Collective::all_reduce_ordered`] sums every rank's
//! contributions in one fixed order, whatever the world size and timing: starting from
//! `+0.0`, rank 0's parts in the order given, then rank 1's, and so on, each added in f32.
//! The training loop gives each rank a contiguous block of a step's micro-batches and
//! contributes one part per micro-batch, so the sum is the one a single device makes
//! accumulating the micro-batches in order: a run gives the same gradients, bit for bit,
//! on 1, 2 or 4 ranks.
//!
//! **The ring.** Rank `r` sends only to rank `r + 1` and receives only from rank `r - 1`
//! (mod the world size), one TCP connection each way. An all-reduce is a chain reduce
//! followed by a chain broadcast, both pipelined in chunks of [`CHUNK`] values: rank 0
//! starts each chunk's sum and passes it on, every rank adds its parts in turn, the last
//! rank holds the total and sends it round the ring back to rank 0, 1, ... . Every link
//! carries the buffer at most twice, so for large buffers this costs about `2 n / B` for
//! `n` bytes on links of bandwidth `B`, like the classic reduce-scatter/all-gather ring
//! (`2 (W-1)/W n / B`), while keeping the fixed order the classic ring cannot.
//!
//! **Failures.** Every socket read and write has a timeout ([`RingConfig::timeout`]), a
//! peer that dies closes its sockets (the neighbours see it at once), and
//! [`RingAbort::abort`] shuts the sockets from another thread (the worker calls it when
//! the coordinator says the attempt is over), so no rank hangs in a collective.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{EngineError, Result};

/// Values per pipelined chunk of an all-reduce (256 KiB of f32).
pub const CHUNK: usize = 1 << 16;

/// The collective operations of a data-parallel group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `out` (on every rank) = the sum of every rank's `parts`, each `out.len()` long,
    /// in the order of the module docs: from `+0.0`, rank 0's parts in order, then rank
    /// 1's, ..., each addition rounded to f32. A rank may contribute no part.
    fn all_reduce_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()>;
    /// Rank 0's `buf` replaces every other rank's.
    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        let mut out = [0f32];
        self.all_reduce_ordered(&[&[1.0]], &mut out)?;
        let w = self.world_size() as f32;
        if out[0] != w {
            return Err(collective_err(format!("barrier counted {} ranks, expected {w}", out[0])));
        }
        Ok(())
    }
}

fn collective_err(m: impl Into<String>) -> EngineError {
    EngineError::Collective(m.into())
}

/// Add the parts into `acc` in order (the per-rank half of the reduction order).
pub(crate) fn add_parts(acc: &mut [f32], parts: &[&[f32]], range: std::ops::Range<usize>) {
    for p in parts {
        for (a, v) in acc.iter_mut().zip(&p[range.clone()]) {
            *a += *v;
        }
    }
}

fn check_parts(parts: &[&[f32]], n: usize) -> Result<()> {
    match parts.iter().position(|p| p.len() != n) {
        Some(i) => Err(collective_err(format!("all-reduce part {i} has {} values, the output {n}", parts[i].len()))),
        None => Ok(()),
    }
}

/// The collective of a run with one rank.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()> {
        check_parts(parts, out.len())?;
        out.fill(0.0);
        add_parts(out, parts, 0..out.len());
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

/// Where a ring rank stands and how long it waits.
#[derive(Debug, Clone)]
pub struct RingConfig {
    pub rank: usize,
    /// Every rank's listening address, by rank.
    pub peers: Vec<SocketAddr>,
    /// Shared by the ranks of one group and no other (e.g. derived from the job and the
    /// attempt's epoch): a connection from another group is refused.
    pub token: u64,
    /// Longest wait of any one socket read or write, and of connecting the ring.
    pub timeout: Duration,
}

/// A rank's listening socket, bound before the addresses are exchanged.
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Bind `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| collective_err(format!("cannot listen on {addr}: {e}")))?;
        Ok(Self { listener })
    }
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }
}

const MAGIC: &[u8; 8] = b"LFRING01";
const OP_REDUCE: u32 = 1;
const OP_RESULT: u32 = 2;
const OP_BCAST: u32 = 3;
/// The largest broadcast accepted (the training loop broadcasts adapter + optimizer state).
const MAX_BCAST: u64 = 16 << 30;

/// Shuts a ring's sockets from another thread: the blocked rank's call fails at once.
#[derive(Clone)]
pub struct RingAbort {
    flag: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl RingAbort {
    /// A handle with no sockets yet (collectives that only poll [`RingAbort::is_aborted`]).
    pub fn new() -> Self {
        Self { flag: Arc::new(AtomicBool::new(false)), streams: Arc::new(Mutex::new(Vec::new())) }
    }
    pub fn abort(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for s in self.streams.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Default for RingAbort {
    fn default() -> Self {
        Self::new()
    }
}

/// A ring of processes (or threads) over TCP; see the module docs.
pub struct TcpRing {
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    timeout: Duration,
    /// To rank + 1 and from rank - 1 (none when alone).
    links: Option<(TcpStream, TcpStream)>,
    seq: u32,
    abort: RingAbort,
    bytes: Vec<u8>,
}

impl TcpRing {
    /// Connect the ring: dial rank + 1, accept rank - 1 (checking its rank and the
    /// group's token), within `cfg.timeout`.
    pub fn connect(listener: RingListener, cfg: RingConfig) -> Result<Self> {
        let world = cfg.peers.len();
        if world == 0 || cfg.rank >= world {
            return Err(collective_err(format!("rank {} of a ring of {world}", cfg.rank)));
        }
        let abort = RingAbort::new();
        let mut ring = Self { rank: cfg.rank, world, peers: cfg.peers.clone(), timeout: cfg.timeout, links: None, seq: 0, abort, bytes: Vec::new() };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + cfg.timeout;
        let right = (cfg.rank + 1) % world;
        let left = (cfg.rank + world - 1) % world;
        let send = dial(cfg.peers[right], deadline, cfg.token, cfg.rank as u32, world as u32)
            .map_err(|e| collective_err(format!("rank {}: cannot connect to rank {right} at {}: {e}", cfg.rank, cfg.peers[right])))?;
        let recv = accept_from(&listener.listener, deadline, cfg.token, left as u32, world as u32)
            .map_err(|e| collective_err(format!("rank {}: no connection from rank {left} ({}): {e}", cfg.rank, cfg.peers[left])))?;
        for s in [&send, &recv] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(cfg.timeout))?;
            s.set_write_timeout(Some(cfg.timeout))?;
        }
        {
            let mut held = ring.abort.streams.lock().unwrap_or_else(|e| e.into_inner());
            held.push(send.try_clone()?);
            held.push(recv.try_clone()?);
        }
        ring.links = Some((send, recv));
        Ok(ring)
    }

    /// A whole ring of `n` ranks on loopback, for ranks that are threads of one process
    /// (the devices of one worker).
    pub fn local(n: usize, timeout: Duration) -> Result<Vec<TcpRing>> {
        let listeners = (0..n).map(|_| RingListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))).collect::<Result<Vec<_>>>()?;
        let peers = listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>>>()?;
        static GROUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let token = (std::process::id() as u64) << 32 ^ nanos ^ GROUPS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self::connect_all(listeners.into_iter().enumerate().map(|(rank, l)| (l, RingConfig { rank, peers: peers.clone(), token, timeout })).collect())
    }

    /// Connect several ranks of this process at once (each [`TcpRing::connect`] waits
    /// for its neighbour, so they run on threads of their own).
    pub fn connect_all(members: Vec<(RingListener, RingConfig)>) -> Result<Vec<TcpRing>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = members.into_iter().map(|(l, cfg)| s.spawn(move || TcpRing::connect(l, cfg))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(collective_err("ring setup thread panicked")))).collect()
        })
    }

    /// A handle that aborts this ring's calls from another thread.
    pub fn abort_handle(&self) -> RingAbort {
        self.abort.clone()
    }

    fn left(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn io_err(&self, what: &str, peer: usize, e: std::io::Error) -> EngineError {
        if self.abort.is_aborted() {
            return collective_err(format!("rank {}: {what} aborted (the attempt was stopped)", self.rank));
        }
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("timed out after {:.0}s", self.timeout.as_secs_f64()),
            std::io::ErrorKind::UnexpectedEof => "the connection was closed (the rank stopped or died)".into(),
            _ => e.to_string(),
        };
        collective_err(format!("rank {}: {what} with rank {peer} ({}): {why}", self.rank, self.peers[peer]))
    }

    fn check_abort(&self) -> Result<()> {
        if self.abort.is_aborted() {
            return Err(collective_err(format!("rank {}: the collective was aborted (the attempt was stopped)", self.rank)));
        }
        Ok(())
    }

    fn send_header(&mut self, op: u32, len: u64) -> Result<()> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&op.to_le_bytes());
        h[4..8].copy_from_slice(&self.seq.to_le_bytes());
        h[8..].copy_from_slice(&len.to_le_bytes());
        let right = (self.rank + 1) % self.world;
        let r = self.links.as_mut().map(|(s, _)| s.write_all(&h)).unwrap_or(Ok(()));
        r.map_err(|e| self.io_err("sending", right, e))
    }

    /// Read a header and check it is `op` of the current call; returns its length.
    fn recv_header(&mut self, op: u32, len: Option<u64>) -> Result<u64> {
        let mut h = [0u8; 16];
        let left = self.left();
        let r = self.links.as_mut().map(|(_, s)| s.read_exact(&mut h)).unwrap_or(Ok(()));
        r.map_err(|e| self.io_err("receiving", left, e))?;
        let got_op = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let got_seq = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let got_len = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
        if got_op != op || got_seq != self.seq || len.is_some_and(|l| l != got_len) {
            return Err(collective_err(format!(
                "rank {}: protocol error from rank {left}: got op {got_op} call {got_seq} length {got_len}, expected op {op} call {} length {len:?} (do the ranks run the same job and version?)",
                self.rank, self.seq
            )));
        }
        Ok(got_len)
    }

    fn send_f32(&mut self, op: u32, v: &[f32]) -> Result<()> {
        self.send_header(op, v.len() as u64)?;
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.clear();
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        let right = (self.rank + 1) % self.world;
        let r = self.links.as_mut().map(|(s, _)| s.write_all(&bytes)).unwrap_or(Ok(()));
        self.bytes = bytes;
        r.map_err(|e| self.io_err("sending", right, e))
    }

    fn recv_f32(&mut self, op: u32, out: &mut [f32]) -> Result<()> {
        self.recv_header(op, Some(out.len() as u64))?;
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.resize(out.len() * 4, 0);
        let left = self.left();
        let r = self.links.as_mut().map(|(_, s)| s.read_exact(&mut bytes)).unwrap_or(Ok(()));
        if let Err(e) = r {
            self.bytes = bytes;
            return Err(self.io_err("receiving", left, e));
        }
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        self.bytes = bytes;
        Ok(())
    }
}

fn write_hello(s: &mut TcpStream, token: u64, rank: u32, world: u32) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(24);
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&token.to_le_bytes());
    m.extend_from_slice(&rank.to_le_bytes());
    m.extend_from_slice(&world.to_le_bytes());
    s.write_all(&m)
}

fn dial(addr: SocketAddr, deadline: Instant, token: u64, rank: u32, world: u32) -> std::io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(mut s) => {
                s.set_write_timeout(Some(left))?;
                write_hello(&mut s, token, rank, world)?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn accept_from(l: &TcpListener, deadline: Instant, token: u64, want_rank: u32, world: u32) -> std::io::Result<TcpStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100))))?;
                let mut m = [0u8; 24];
                match s.read_exact(&mut m) {
                    Ok(()) => {
                        let t = u64::from_le_bytes(m[8..16].try_into().expect("8 bytes"));
                        let r = u32::from_le_bytes(m[16..20].try_into().expect("4 bytes"));
                        let w = u32::from_le_bytes(m[20..24].try_into().expect("4 bytes"));
                        if &m[..8] == MAGIC && t == token && r == want_rank && w == world {
                            return Ok(s);
                        }
                        tracing::warn!(from = %from, rank = r, world = w, "refused a ring connection from another group or rank");
                    }
                    Err(e) => tracing::warn!(from = %from, error = %e, "ring connection without a greeting"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()> {
        check_parts(parts, out.len())?;
        self.check_abort()?;
        self.seq = self.seq.wrapping_add(1);
        let (w, r, n) = (self.world, self.rank, out.len());
        if w == 1 {
            return Solo.all_reduce_ordered(parts, out);
        }
        // Chain reduce 0 -> 1 -> ... -> W-1, chunk by chunk.
        for a in (0..n.max(1)).step_by(CHUNK) {
            let range = a..(a + CHUNK).min(n);
            let acc = &mut out[range.clone()];
            if r == 0 {
                acc.fill(0.0);
            } else {
                self.recv_f32(OP_REDUCE, acc)?;
            }
            add_parts(acc, parts, range.clone());
            if r != w - 1 {
                self.send_f32(OP_REDUCE, &out[range])?;
            }
        }
        // Chain broadcast of the total W-1 -> 0 -> 1 -> ... -> W-2.
        for a in (0..n.max(1)).step_by(CHUNK) {
            let range = a..(a + CHUNK).min(n);
            if r != w - 1 {
                self.recv_f32(OP_RESULT, &mut out[range.clone()])?;
            }
            if r != w - 2 {
                self.send_f32(OP_RESULT, &out[range])?;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.check_abort()?;
        self.seq = self.seq.wrapping_add(1);
        let (w, r) = (self.world, self.rank);
        if w == 1 {
            return Ok(());
        }
        if r != 0 {
            let len = self.recv_header(OP_BCAST, None)?;
            if len > MAX_BCAST {
                return Err(collective_err(format!("rank {r}: broadcast of {len} bytes exceeds the {MAX_BCAST}-byte limit")));
            }
            buf.resize(len as usize, 0);
            let left = self.left();
            let res = self.links.as_mut().map(|(_, s)| s.read_exact(buf)).unwrap_or(Ok(()));
            res.map_err(|e| self.io_err("receiving", left, e))?;
        }
        if r != w - 1 {
            self.send_header(OP_BCAST, buf.len() as u64)?;
            let right = r + 1;
            let res = self.links.as_mut().map(|(s, _)| s.write_all(buf)).unwrap_or(Ok(()));
            res.map_err(|e| self.io_err("sending", right, e))?;
        }
        Ok(())
    }
}

/// NCCL between CUDA devices (builds with the `nccl` feature): one communicator per gang,
/// one rank per GPU, the unique id made by rank 0 ([`nccl::unique_id`]) and handed to the
/// others by the coordinator's rendezvous.
///
/// The reduction keeps the fixed order of the module docs, so a gang on GPUs trains the
/// same adapter on any number of GPUs too: the running sum travels the chain 0 -> W-1
/// with `ncclSend`/`ncclRecv` (each rank adds its parts on the host, in f32, as the TCP
/// ring does), then `ncclBroadcast` from rank W-1 hands the total to every rank. For
/// LoRA-sized buffers this costs about W hops of `n / B` plus two host copies per hop
/// (a few milliseconds at 8 GPUs for r = 8, see docs/benchmarks.md) instead of
/// `ncclAllReduce`'s `2 n / B`, in exchange for bit-equal results. Every call waits on
/// a CUDA event with the collective timeout and the abort flag, so a dead peer or a
/// stopped attempt does not hang the rank (the communicator is aborted on drop).
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::{add_parts, check_parts, collective_err, Collective, RingAbort, Solo, MAX_BCAST};
    use crate::Result;
    use candle_core::cuda_backend::cudarc;
    use cudarc::driver::CudaStream;
    use cudarc::nccl::safe::{Comm, Id};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Bytes of an NCCL unique id.
    pub const UNIQUE_ID_BYTES: usize = 128;

    fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> crate::EngineError {
        collective_err(format!("nccl {what}: {:?}", e.0))
    }

    fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> crate::EngineError {
        collective_err(format!("nccl {what}: {e}"))
    }

    /// A new communicator id (rank 0 makes it once per gang attempt).
    pub fn unique_id() -> Result<Vec<u8>> {
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(id.internal().iter().map(|c| *c as u8).collect())
    }

    /// One rank of an NCCL communicator.
    pub struct NcclCollective {
        comm: Comm,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        timeout: Duration,
        abort: RingAbort,
    }

    // SAFETY: the communicator is used by one thread at a time (the rank's training
    // thread; `&mut self` on every operation), which NCCL allows from any thread.
    unsafe impl Send for NcclCollective {}

    impl NcclCollective {
        /// Join the communicator `id` as `rank` of `world` on a CUDA `device`; returns once
        /// every rank has joined (ncclCommInitRank).
        pub fn new(device: &candle_core::Device, rank: usize, world: usize, id: &[u8], timeout: Duration) -> Result<Self> {
            let candle_core::Device::Cuda(d) = device else {
                return Err(collective_err(format!("nccl needs a CUDA device, got {:?}", device.location())));
            };
            if id.len() != UNIQUE_ID_BYTES {
                return Err(collective_err(format!("nccl unique id has {} bytes, expected {UNIQUE_ID_BYTES}", id.len())));
            }
            let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
            for (dst, src) in internal.iter_mut().zip(id) {
                *dst = *src as std::ffi::c_char;
            }
            let stream = d.cuda_stream();
            stream.context().bind_to_thread().map_err(|e| cuda_err("binding the device", e))?;
            let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Self { comm, stream, rank, world, timeout, abort: RingAbort::new() })
        }

        /// A communicator over the CUDA `devices` of this process, one rank each, joined
        /// on threads (ncclCommInitRank waits for every rank).
        pub fn local(devices: &[candle_core::Device], timeout: Duration) -> Result<Vec<NcclCollective>> {
            Self::join_all(devices, 0, devices.len(), &unique_id()?, timeout)
        }

        /// Join communicator `id` with ranks `first_rank..` on `devices`, on threads.
        pub fn join_all(devices: &[candle_core::Device], first_rank: usize, world: usize, id: &[u8], timeout: Duration) -> Result<Vec<NcclCollective>> {
            std::thread::scope(|s| {
                let hs: Vec<_> = devices.iter().enumerate().map(|(i, d)| s.spawn(move || NcclCollective::new(d, first_rank + i, world, id, timeout))).collect();
                hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(collective_err("nccl setup thread panicked")))).collect()
            })
        }

        /// A handle that makes this rank's waiting calls fail at once.
        pub fn abort_handle(&self) -> RingAbort {
            self.abort.clone()
        }

        /// Wait for the stream's work so far, polling the abort flag, up to the timeout.
        fn wait(&self, what: &str) -> Result<()> {
            let ev = self.stream.record_event(None).map_err(|e| cuda_err("recording an event", e))?;
            let deadline = Instant::now() + self.timeout;
            loop {
                match ev.try_is_complete() {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => return Err(cuda_err(what, e)),
                }
                if self.abort.is_aborted() {
                    return Err(collective_err(format!("rank {}: nccl {what} aborted (the attempt was stopped)", self.rank)));
                }
                if Instant::now() >= deadline {
                    return Err(collective_err(format!("rank {}: nccl {what} timed out after {:.0}s", self.rank, self.timeout.as_secs_f64())));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }

        fn bind(&self) -> Result<()> {
            if self.abort.is_aborted() {
                return Err(collective_err(format!("rank {}: the collective was aborted (the attempt was stopped)", self.rank)));
            }
            self.stream.context().bind_to_thread().map_err(|e| cuda_err("binding the device", e))
        }
    }

    impl Collective for NcclCollective {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce_ordered(&mut self, parts: &[&[f32]], out: &mut [f32]) -> Result<()> {
            check_parts(parts, out.len())?;
            let (r, w, n) = (self.rank, self.world, out.len());
            if w == 1 {
                return Solo.all_reduce_ordered(parts, out);
            }
            if n == 0 {
                return Ok(());
            }
            self.bind()?;
            let mut dev = self.stream.alloc_zeros::<f32>(n).map_err(|e| cuda_err("allocating", e))?;
            if r == 0 {
                out.fill(0.0);
            } else {
                self.comm.recv(&mut dev, (r - 1) as i32).map_err(|e| nccl_err("ncclRecv", e))?;
                self.wait("receiving")?;
                self.stream.memcpy_dtoh(&dev, out).map_err(|e| cuda_err("copying to the host", e))?;
            }
            add_parts(out, parts, 0..n);
            self.stream.memcpy_htod(out, &mut dev).map_err(|e| cuda_err("copying to the device", e))?;
            if r != w - 1 {
                self.comm.send(&dev, (r + 1) as i32).map_err(|e| nccl_err("ncclSend", e))?;
                self.wait("sending")?;
            }
            self.comm.broadcast_in_place(&mut dev, (w - 1) as i32).map_err(|e| nccl_err("ncclBroadcast", e))?;
            self.wait("broadcasting the sum")?;
            self.stream.memcpy_dtoh(&dev, out).map_err(|e| cuda_err("copying to the host", e))?;
            Ok(())
        }

        fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<()> {
            if self.world == 1 {
                return Ok(());
            }
            self.bind()?;
            let mut len = self.stream.clone_htod(&[buf.len() as u64]).map_err(|e| cuda_err("copying to the device", e))?;
            self.comm.broadcast_in_place(&mut len, 0).map_err(|e| nccl_err("ncclBroadcast", e))?;
            self.wait("broadcasting a length")?;
            let mut l = [0u64];
            self.stream.memcpy_dtoh(&len, &mut l).map_err(|e| cuda_err("copying to the host", e))?;
            if l[0] > MAX_BCAST {
                return Err(collective_err(format!("rank {}: broadcast of {} bytes exceeds the {MAX_BCAST}-byte limit", self.rank, l[0])));
            }
            if l[0] == 0 {
                buf.clear();
                return Ok(());
            }
            if self.rank != 0 {
                buf.resize(l[0] as usize, 0);
            }
            let mut d = self.stream.clone_htod(buf.as_slice()).map_err(|e| cuda_err("copying to the device", e))?;
            self.comm.broadcast_in_place(&mut d, 0).map_err(|e| nccl_err("ncclBroadcast", e))?;
            self.wait("broadcasting")?;
            self.stream.memcpy_dtoh(&d, buf.as_mut_slice()).map_err(|e| cuda_err("copying to the host", e))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rings(n: usize) -> Vec<TcpRing> {
        TcpRing::local(n, Duration::from_secs(10)).unwrap()
    }

    /// Each rank contributes `parts[rank]`; returns every rank's output.
    fn reduce_on(rings: Vec<TcpRing>, parts: Vec<Vec<Vec<f32>>>, n: usize) -> Vec<Vec<f32>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = rings
                .into_iter()
                .zip(parts)
                .map(|(mut ring, p)| {
                    s.spawn(move || {
                        let refs: Vec<&[f32]> = p.iter().map(|v| v.as_slice()).collect();
                        let mut out = vec![f32::NAN; n];
                        ring.all_reduce_ordered(&refs, &mut out).unwrap();
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Values whose sum depends on the order of additions.
    fn awkward(seed: u32, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) as f32 / 1e3).sin() * 10f32.powi((i % 7) as i32 - 3)).collect()
    }

    #[test]
    fn the_order_is_the_sequential_one_whatever_the_world_size() {
        let n = CHUNK * 2 + 77;
        let micro: Vec<Vec<f32>> = (0..6).map(|j| awkward(j, n)).collect();
        let mut expect = vec![0f32; n];
        for m in &micro {
            for (e, v) in expect.iter_mut().zip(m) {
                *e += *v;
            }
        }
        // The pairwise order (a different rounding) really differs, so the check means something.
        let pairwise: Vec<f32> = (0..n).map(|i| (micro[0][i] + micro[1][i] + micro[2][i]) + (micro[3][i] + micro[4][i] + micro[5][i])).collect();
        assert!(expect.iter().zip(&pairwise).any(|(a, b)| a.to_bits() != b.to_bits()));
        for world in [1usize, 2, 3, 6] {
            let per = 6 / world;
            let parts: Vec<Vec<Vec<f32>>> = (0..world).map(|r| micro[r * per..(r + 1) * per].to_vec()).collect();
            for out in reduce_on(rings(world), parts, n) {
                assert!(out.iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world}");
            }
        }
        // A rank may contribute nothing.
        let parts = vec![micro[..4].to_vec(), vec![], micro[4..].to_vec()];
        for out in reduce_on(rings(3), parts, n) {
            assert!(out.iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        let rs = rings(3);
        let outs: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = rs
                .into_iter()
                .map(|mut ring| {
                    s.spawn(move || {
                        let mut buf = if ring.rank() == 0 { b"adapter state".to_vec() } else { vec![9; 3] };
                        ring.barrier().unwrap();
                        ring.broadcast(&mut buf).unwrap();
                        let mut empty = Vec::new();
                        ring.broadcast(&mut empty).unwrap();
                        assert!(empty.is_empty());
                        ring.barrier().unwrap();
                        buf
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(outs.iter().all(|b| b == b"adapter state"));
    }

    #[test]
    fn a_dead_peer_fails_the_call_at_once_and_a_silent_one_times_out() {
        // Rank 1 goes away: rank 0's call fails promptly instead of hanging.
        let mut rs = TcpRing::local(2, Duration::from_secs(30)).unwrap();
        drop(rs.pop());
        let t = Instant::now();
        let err = rs[0].all_reduce_ordered(&[&[1.0; 1000]], &mut [0.0; 1000]).unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(err.contains("rank 1"), "{err}");
        // Rank 1 is alive but never calls: rank 0 times out.
        let mut rs = TcpRing::local(2, Duration::from_millis(300)).unwrap();
        let t = Instant::now();
        let err = rs[0].barrier().unwrap_err().to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(rs);
    }

    #[test]
    fn abort_unblocks_a_waiting_rank() {
        let mut rs = TcpRing::local(2, Duration::from_secs(60)).unwrap();
        let abort = rs[0].abort_handle();
        let mut r0 = rs.remove(0);
        let t = Instant::now();
        let h = std::thread::spawn(move || r0.barrier());
        std::thread::sleep(Duration::from_millis(200));
        abort.abort();
        let err = h.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("aborted"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(rs);
    }

    #[test]
    fn another_group_cannot_join() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peers = vec![a.local_addr().unwrap(), b.local_addr().unwrap()];
        let timeout = Duration::from_millis(800);
        let (p0, p1) = (peers.clone(), peers);
        let h = std::thread::spawn(move || TcpRing::connect(a, RingConfig { rank: 0, peers: p0, token: 1, timeout }));
        let r1 = TcpRing::connect(b, RingConfig { rank: 1, peers: p1, token: 2, timeout });
        assert!(r1.is_err());
        assert!(h.join().unwrap().is_err());
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let err = Solo.all_reduce_ordered(&[&[1.0, 2.0]], &mut [0.0; 3]).unwrap_err().to_string();
        assert!(err.contains("part 0 has 2 values"), "{err}");
    }
}
