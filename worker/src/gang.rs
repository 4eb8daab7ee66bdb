//! A gang member's start: bind one collective listener per leased device, exchange the
//! endpoints through the coordinator's Rendezvous (fenced by the epoch like every worker
//! call), and connect this worker's ranks into the gang's ring.

use crate::job::{call_with_retry, retryable, Outcome};
use crate::{JobControl, Worker};
use lorafleet_engine::collective::{Collective, RingConfig, RingListener, TcpRing};
use lorafleet_proto as pb;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The host the other members reach this worker at: `--advertise-host`, else the local
/// address of the route to the coordinator (loopback for a coordinator on loopback).
pub fn advertise_host(w: &Worker) -> String {
    if let Some(h) = &w.cfg.advertise_host {
        return h.clone();
    }
    let target = w.cfg.coordinator.parse::<tonic::codegen::http::Uri>().ok().and_then(|u| {
        let host = u.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
        Some((host, u.port_u16().unwrap_or(80)))
    });
    let local = target.and_then(|(host, port)| {
        use std::net::ToSocketAddrs;
        let addr = (host.as_str(), port).to_socket_addrs().ok()?.next()?;
        let bind: SocketAddr = if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        let s = std::net::UdpSocket::bind(bind).ok()?;
        s.connect(addr).ok()?;
        Some(s.local_addr().ok()?.ip())
    });
    match local {
        Some(ip) => ip.to_string(),
        None => {
            warn!(coordinator = %w.cfg.coordinator, "cannot tell which local address reaches the coordinator; advertising 127.0.0.1 (set --advertise-host)");
            "127.0.0.1".into()
        }
    }
}

fn stopped(ctl: &JobControl) -> Outcome {
    if ctl.is_abandoned() {
        Outcome::Abandoned
    } else if ctl.is_cancelled() {
        Outcome::Cancelled
    } else {
        Outcome::Shutdown
    }
}

/// Whether this worker, as node 0, makes the gang use NCCL: a build with it, CUDA
/// devices, and `--collective auto`.
fn offers_nccl(w: &Worker, devices: &[candle_core::Device]) -> bool {
    cfg!(feature = "cuda") && w.cfg.allow_nccl && !devices.is_empty() && devices.iter().all(|d| d.is_cuda())
}

/// Join the gang of `lease` with this worker's `devices`: returns their ranks'
/// collectives, in rank order (NCCL when node 0 chose it, else the TCP ring).
pub async fn join(w: &Worker, lease: &pb::Lease, g: &pb::Gang, devices: &[candle_core::Device], ctl: &Arc<JobControl>) -> Result<Vec<Box<dyn Collective>>, Outcome> {
    let local = devices.len();
    let host = advertise_host(w);
    let bind_ip: IpAddr = host.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let listeners = (0..local.max(1))
        .map(|_| RingListener::bind(SocketAddr::new(bind_ip, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| retryable(format!("gang: {e}")))?;
    let mut endpoints = Vec::with_capacity(listeners.len());
    for l in &listeners {
        let port = l.local_addr().map_err(|e| retryable(format!("gang: {e}")))?.port();
        endpoints.push(if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") });
    }
    info!(job_id = %lease.job_id, epoch = lease.epoch, node = g.node_rank, nodes = g.nodes, endpoints = ?endpoints, "gang rendezvous");
    let nccl_unique_id = if g.node_rank == 0 && offers_nccl(w, devices) { nccl_unique_id()? } else { Vec::new() };
    let req = pb::RendezvousRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        worker_id: w.shared.worker_id(),
        endpoints,
        nccl_unique_id,
    };
    // Every member polls until all have called; a member that never comes loses its
    // lease, which ends the attempt (our next call is refused: abandon).
    let resp = loop {
        if ctl.should_stop() {
            return Err(stopped(ctl));
        }
        let r = call_with_retry(w, ctl, |mut c| {
            let req = req.clone();
            async move { c.rendezvous(req).await }
        })
        .await?;
        if r.ready {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if resp.endpoints.len() != g.world_size as usize {
        return Err(retryable(format!("gang: rendezvous returned {} endpoints for {} ranks", resp.endpoints.len(), g.world_size)));
    }
    if !resp.nccl_unique_id.is_empty() {
        return connect_nccl(lease, g, devices, resp.nccl_unique_id, w.cfg.collective_timeout, ctl).await;
    }
    let mut peers = Vec::with_capacity(resp.endpoints.len());
    for e in &resp.endpoints {
        let addr = tokio::net::lookup_host(e.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| retryable(format!("gang: cannot resolve a member's endpoint {e:?}")))?;
        peers.push(addr);
    }
    let (first, token, timeout) = (g.first_rank as usize, resp.group_token, w.cfg.collective_timeout);
    let members = listeners.into_iter().enumerate().map(|(i, l)| (l, RingConfig { rank: first + i, peers: peers.clone(), token, timeout })).collect();
    let rings = match tokio::task::spawn_blocking(move || TcpRing::connect_all(members)).await.map_err(|e| retryable(format!("gang: {e}")))? {
        Ok(r) => r,
        Err(e) if ctl.should_stop() => {
            warn!(job_id = %lease.job_id, error = %e, "gang ring not connected: the attempt was stopped");
            return Err(stopped(ctl));
        }
        Err(e) => return Err(retryable(format!("gang: {e}"))),
    };
    let mut out: Vec<Box<dyn Collective>> = Vec::new();
    for ring in rings {
        ctl.add_ring(ring.abort_handle());
        out.push(Box::new(ring));
    }
    info!(job_id = %lease.job_id, epoch = lease.epoch, node = g.node_rank, ranks = out.len(), "gang ring connected");
    Ok(out)
}

#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>, Outcome> {
    lorafleet_engine::collective::nccl::unique_id().map_err(|e| retryable(format!("gang: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>, Outcome> {
    Ok(Vec::new())
}

/// Join node 0's NCCL communicator with one rank per local CUDA device.
#[cfg(feature = "cuda")]
async fn connect_nccl(
    lease: &pb::Lease,
    g: &pb::Gang,
    devices: &[candle_core::Device],
    id: Vec<u8>,
    timeout: Duration,
    ctl: &Arc<JobControl>,
) -> Result<Vec<Box<dyn Collective>>, Outcome> {
    use lorafleet_engine::collective::nccl::NcclCollective;
    if !devices.iter().all(|d| d.is_cuda()) {
        return Err(crate::job::non_retryable("gang: node 0 chose NCCL, but this member's devices are not CUDA devices (give every member of a CUDA gang CUDA devices)"));
    }
    let (first, world, devices) = (g.first_rank as usize, g.world_size as usize, devices.to_vec());
    let comms = tokio::task::spawn_blocking(move || NcclCollective::join_all(&devices, first, world, &id, timeout))
        .await
        .map_err(|e| retryable(format!("gang: {e}")))?
        .map_err(|e| retryable(format!("gang: {e}")))?;
    let mut out: Vec<Box<dyn Collective>> = Vec::new();
    for c in comms {
        ctl.add_ring(c.abort_handle());
        out.push(Box::new(c));
    }
    info!(job_id = %lease.job_id, epoch = lease.epoch, node = g.node_rank, ranks = out.len(), "gang NCCL communicator joined");
    Ok(out)
}

#[cfg(not(feature = "cuda"))]
async fn connect_nccl(
    _lease: &pb::Lease,
    _g: &pb::Gang,
    _devices: &[candle_core::Device],
    _id: Vec<u8>,
    _timeout: Duration,
    _ctl: &Arc<JobControl>,
) -> Result<Vec<Box<dyn Collective>>, Outcome> {
    Err(crate::job::non_retryable(
        "gang: node 0 chose NCCL, but this worker was built without the `cuda` feature (build every member of a CUDA gang with scripts/build-cuda.sh)",
    ))
}
