//! The queue of runnable jobs and the matching of jobs to a worker's free devices. Pure
//! data structure: no I/O, no clock (times are passed in), driven by the control loop.
//!
//! Order: higher `priority` first; FIFO (submission order) within a priority. With
//! aging on (`aging_ms > 0`) a job gains one priority level per `aging_ms` it has waited,
//! so a stream of higher-priority jobs cannot starve a low-priority one forever. Since
//! every job ages at the same rate, that order is a static key,
//! `priority * aging_ms - created_ms`, and the queue stays a `BTreeMap`.
//!
//! Large jobs vs small ones (reservation): when the first job in order that *could*
//! run on a worker (enough matching devices in total) does not fit the worker's
//! *currently free* devices, the worker is reserved for it and takes nothing else, so
//! the devices it frees accumulate for the large job instead of being taken one by one
//! by smaller jobs behind it. One worker per blocked job: a job already reserved on
//! another worker is skipped, so other workers keep backfilling smaller jobs. Any worker
//! whose free devices fit a reserved job takes it at once.
//!
//! Gangs (`resources.nodes > 1`): a worker whose free devices fit the first gang job in
//! order it could run is told to *join* it ([`Pick::Join`]); the job stays queued while
//! the control loop assembles it ([`Assembly`]): joined workers are held (they take
//! nothing else) until `nodes` of them are held, then every member's lease is written in
//! one transaction (never a partial gang). The policy that keeps gangs and the rest of
//! the cluster from starving each other lives in the control loop (`handlers.rs`): an
//! assembly holds its workers for at most its hold time (doubling after each failed
//! round), then lets them go and the gang is *parked* ([`Queue::park`]: out of the order,
//! still queued) for as long as it held them, so that smaller jobs run meanwhile; a gang
//! that more workers than are registered could fit is parked until enough register.
//!
//! Tenants (fair share and quotas, [`Queue::pick_fair`]): each tenant has its own order
//! (the one above), and a worker looks at the tenants in fair-share order: the tenant
//! whose running jobs hold the fewest devices first (then the fewest running jobs, then
//! whose first job comes first in the order above). So one tenant's 10,000 queued jobs do
//! not starve another's one: as soon as a device frees up, the tenant using less gets it.
//! Priorities order jobs within a tenant only (any tenant could set any priority). A
//! tenant at its quota of running jobs or devices ([`crate::quota`]) is passed over, and
//! its job is reported as held with the reason. Jobs without a tenant form one tenant.

use crate::persistence::DeviceInfo;
use crate::quota::{Quotas, TenantLoad};
use lorafleet_shared::ids::{JobId, WorkerId};
use lorafleet_shared::spec::{DeviceKind, ResourceSpec};
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A tenant's name (`""`: jobs without a tenant).
pub type Tenant = Arc<str>;

#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    pub id: JobId,
    /// Submission order.
    pub seq: i64,
    pub priority: i32,
    pub created_ms: i64,
    pub resources: ResourceSpec,
    pub tenant: Tenant,
}

impl QueuedJob {
    /// Devices the whole job holds (every node's).
    pub fn devices(&self) -> u32 {
        // Both at most 1,024 (spec validation): the product fits.
        self.resources.ranks() as u32
    }
}

/// What fair share and quotas look at in a pick: the devices and running jobs of each
/// tenant, and the tenants' quotas.
#[derive(Debug, Clone, Copy)]
pub struct Fairness<'a> {
    pub load: &'a HashMap<Tenant, TenantLoad>,
    pub quotas: &'a Quotas,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    score: Reverse<i64>,
    seq: i64,
}

/// The index of a device kind in per-kind arrays (cpu 0, cuda 1).
pub(crate) fn kind_index(k: DeviceKind) -> usize {
    match k {
        DeviceKind::Cpu => 0,
        DeviceKind::Cuda => 1,
    }
}

/// What a worker should do next ([`Queue::pick`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// Run this job on these devices now (it left the queue).
    Take(QueuedJob, Vec<u32>),
    /// Join the assembly of this gang job with these devices (it stays queued).
    Join(QueuedJob, Vec<u32>),
}

/// The workers held for a gang job while it is assembled, in joining order (the first is
/// node 0), and how long they may be held.
#[derive(Debug, Clone)]
pub struct Assembly {
    pub members: Vec<(WorkerId, Vec<u32>)>,
    pub started: std::time::Instant,
    pub hold: std::time::Duration,
}

#[derive(Debug, Default)]
pub struct Queue {
    /// One ordered queue per device kind and tenant, so a worker never scans jobs for
    /// devices it lacks.
    by_kind: [HashMap<Tenant, BTreeMap<Key, QueuedJob>>; 2],
    keys: HashMap<JobId, (usize, Tenant, Key)>,
    /// Queued jobs of each tenant, parked ones included.
    counts: HashMap<Tenant, usize>,
    reservations: HashMap<JobId, WorkerId>,
    /// Gang jobs out of the order for now (still queued).
    parked: HashMap<JobId, QueuedJob>,
    /// Every queued job (parked ones included) by device kind, oldest first
    /// (`created_ms`, `seq`): the scaling metrics.
    by_age: [std::collections::BTreeSet<(i64, i64)>; 2],
    aging_ms: i64,
}

enum Candidate {
    Take(Key, usize, Vec<u32>),
    Join(Key, usize, Vec<u32>),
    Hold(Key, JobId),
}

impl Candidate {
    fn key(&self) -> Key {
        match self {
            Candidate::Take(k, ..) | Candidate::Join(k, ..) | Candidate::Hold(k, ..) => *k,
        }
    }
}

fn eligible(res: &ResourceSpec, d: &DeviceInfo) -> bool {
    d.kind == res.device && (res.memory_mib == 0 || d.memory_mib >= res.memory_mib)
}

/// Enough matching devices in total (ignoring what is busy)?
pub fn could_fit(res: &ResourceSpec, devices: &[DeviceInfo]) -> bool {
    devices.iter().filter(|d| eligible(res, d)).count() >= res.count.max(1) as usize
}

/// The lowest-indexed free matching devices, if there are enough.
pub fn fit_now(res: &ResourceSpec, devices: &[DeviceInfo], busy: &HashSet<u32>) -> Option<Vec<u32>> {
    let mut free: Vec<u32> = devices.iter().filter(|d| eligible(res, d) && !busy.contains(&d.index)).map(|d| d.index).collect();
    free.sort_unstable();
    let n = res.count.max(1) as usize;
    (free.len() >= n).then(|| free[..n].to_vec())
}

impl Queue {
    /// `aging_ms`: waiting this long is worth one priority level (0 disables aging).
    pub fn new(aging_ms: i64) -> Self {
        Self { aging_ms: aging_ms.max(0), ..Default::default() }
    }

    fn key(&self, j: &QueuedJob) -> Key {
        let score = if self.aging_ms > 0 {
            (j.priority as i64).saturating_mul(self.aging_ms).saturating_sub(j.created_ms)
        } else {
            j.priority as i64
        };
        Key { score: Reverse(score), seq: j.seq }
    }

    pub fn push(&mut self, j: QueuedJob) {
        if self.keys.contains_key(&j.id) || self.parked.contains_key(&j.id) {
            return;
        }
        let k = self.key(&j);
        let q = kind_index(j.resources.device);
        *self.counts.entry(j.tenant.clone()).or_default() += 1;
        self.by_age[q].insert((j.created_ms, j.seq));
        self.keys.insert(j.id, (q, j.tenant.clone(), k));
        self.by_kind[q].entry(j.tenant.clone()).or_default().insert(k, j);
    }

    /// Take `id` out of its tenant's order (not out of the counts).
    fn unlink(&mut self, id: &JobId) -> Option<QueuedJob> {
        let (q, t, k) = self.keys.remove(id)?;
        let m = self.by_kind[q].get_mut(&t)?;
        let j = m.remove(&k);
        if m.is_empty() {
            self.by_kind[q].remove(&t);
        }
        j
    }

    fn uncount(&mut self, t: &Tenant) {
        if let Some(n) = self.counts.get_mut(t) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(t);
            }
        }
    }

    pub fn remove(&mut self, id: &JobId) -> Option<QueuedJob> {
        self.reservations.remove(id);
        let j = match self.parked.remove(id) {
            Some(j) => Some(j),
            None => self.unlink(id),
        }?;
        self.uncount(&j.tenant);
        self.by_age[kind_index(j.resources.device)].remove(&(j.created_ms, j.seq));
        Some(j)
    }

    /// Take a queued job out of the order (it stays queued: [`Queue::unpark`] puts it
    /// back in its place).
    pub fn park(&mut self, id: &JobId) -> bool {
        self.reservations.remove(id);
        match self.unlink(id) {
            Some(j) => {
                self.parked.insert(*id, j);
                true
            }
            None => false,
        }
    }

    pub fn unpark(&mut self, id: &JobId) {
        if let Some(j) = self.parked.remove(id) {
            self.uncount(&j.tenant);
            self.push(j);
        }
    }

    pub fn is_parked(&self, id: &JobId) -> bool {
        self.parked.contains_key(id)
    }

    /// A queued job, parked or not.
    pub fn get(&self, id: &JobId) -> Option<&QueuedJob> {
        if let Some(j) = self.parked.get(id) {
            return Some(j);
        }
        let (q, t, k) = self.keys.get(id)?;
        self.by_kind[*q].get(t)?.get(k)
    }

    pub fn contains(&self, id: &JobId) -> bool {
        self.keys.contains_key(id) || self.parked.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.keys.len() + self.parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.parked.is_empty()
    }

    /// Per device kind (cpu, cuda): the queued jobs (parked ones included) and the
    /// `created_ms` of the oldest.
    pub fn by_device(&self) -> [(usize, Option<i64>); 2] {
        [0, 1].map(|q| (self.by_age[q].len(), self.by_age[q].first().map(|(c, _)| *c)))
    }

    /// Queued jobs of `tenant`, parked ones included.
    pub fn queued_of(&self, tenant: &str) -> usize {
        self.counts.get(tenant).copied().unwrap_or(0)
    }

    pub fn reserved_for(&self, id: &JobId) -> Option<WorkerId> {
        self.reservations.get(id).copied()
    }

    /// Forget every reservation held by a worker (it died or left).
    pub fn drop_reservations_of(&mut self, worker: &WorkerId) {
        self.reservations.retain(|_, w| w != worker);
    }

    /// [`Queue::pick_fair`] with every tenant idle and no quotas.
    pub fn pick(&mut self, worker: WorkerId, devices: &[DeviceInfo], busy: &HashSet<u32>) -> Option<Pick> {
        let (load, quotas) = (HashMap::new(), Quotas::default());
        self.pick_fair(worker, devices, busy, Fairness { load: &load, quotas: &quotas }, &mut Vec::new())
    }

    /// The job this worker should run next on its free devices, removed from the
    /// queue, with the devices to use; `None` when nothing fits now (possibly because
    /// the worker was just reserved for a larger job). Tenants are looked at in
    /// fair-share order (module docs); the first job of each tenant a quota holds back is
    /// added to `held` with the reason.
    pub fn pick_fair(
        &mut self,
        worker: WorkerId,
        devices: &[DeviceInfo],
        busy: &HashSet<u32>,
        fair: Fairness<'_>,
        held: &mut Vec<(JobId, String)>,
    ) -> Option<Pick> {
        let mut kinds: Vec<usize> = devices.iter().map(|d| kind_index(d.kind)).collect();
        kinds.sort_unstable();
        kinds.dedup();
        // The tenants with jobs of these kinds, each with its first job in order.
        let mut heads: HashMap<&Tenant, (Key, JobId)> = HashMap::new();
        for &q in &kinds {
            for (t, m) in &self.by_kind[q] {
                let Some((k, j)) = m.first_key_value() else { continue };
                let e = heads.entry(t).or_insert((*k, j.id));
                if *k < e.0 {
                    *e = (*k, j.id);
                }
            }
        }
        let mut order: Vec<(TenantLoad, Key, JobId, Tenant)> =
            heads.into_iter().map(|(t, (k, id))| (fair.load.get(t).copied().unwrap_or_default(), k, id, t.clone())).collect();
        order.sort_by_key(|a| (a.0, a.1));
        for (load, _, head, t) in order {
            if let Some(reason) = fair.quotas.hold(&t, load, 0) {
                held.push((head, reason));
                continue;
            }
            let mut best: Option<Candidate> = None;
            let mut reported = false;
            for &q in &kinds {
                let Some(m) = self.by_kind[q].get(&t) else { continue };
                for (k, j) in m {
                    if best.as_ref().is_some_and(|b| b.key() < *k) {
                        break;
                    }
                    if !could_fit(&j.resources, devices) {
                        continue;
                    }
                    if let Some(reason) = fair.quotas.hold(&t, load, j.devices()) {
                        if !std::mem::replace(&mut reported, true) {
                            held.push((j.id, reason));
                        }
                        continue;
                    }
                    let gang = j.resources.nodes > 1;
                    match fit_now(&j.resources, devices, busy) {
                        Some(devs) if gang => {
                            best = Some(Candidate::Join(*k, q, devs));
                            break;
                        }
                        Some(devs) => {
                            best = Some(Candidate::Take(*k, q, devs));
                            break;
                        }
                        // A gang is assembled from free workers; a busy one looks further.
                        None if gang => continue,
                        None => {}
                    }
                    match self.reservations.get(&j.id) {
                        Some(w) if *w != worker => continue,
                        _ => {
                            best = Some(Candidate::Hold(*k, j.id));
                            break;
                        }
                    }
                }
            }
            let Some(best) = best else { continue };
            return match best {
                Candidate::Take(k, q, devs) => {
                    let id = self.by_kind[q][&t][&k].id;
                    let j = self.remove(&id).expect("candidate is queued");
                    Some(Pick::Take(j, devs))
                }
                Candidate::Join(k, q, devs) => Some(Pick::Join(self.by_kind[q][&t][&k].clone(), devs)),
                Candidate::Hold(_, id) => {
                    self.reservations.insert(id, worker);
                    None
                }
            };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(kind: DeviceKind, index: u32, memory_mib: u64) -> DeviceInfo {
        DeviceInfo { kind, index, name: format!("d{index}"), memory_mib }
    }

    fn job(seq: i64, priority: i32, device: DeviceKind, count: u32, memory_mib: u64) -> QueuedJob {
        QueuedJob { id: JobId::new(), seq, priority, created_ms: seq * 1000, resources: ResourceSpec { device, count, memory_mib, nodes: 1 }, tenant: "".into() }
    }

    /// A pick of a queue without gangs.
    fn take(q: &mut Queue, w: WorkerId, devices: &[DeviceInfo], busy: &HashSet<u32>) -> Option<(QueuedJob, Vec<u32>)> {
        match q.pick(w, devices, busy)? {
            Pick::Take(j, d) => Some((j, d)),
            Pick::Join(j, _) => panic!("{} is not a gang", j.id),
        }
    }

    fn cpu() -> Vec<DeviceInfo> {
        vec![dev(DeviceKind::Cpu, 0, 0)]
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = Queue::new(0);
        let a = job(1, 0, DeviceKind::Cpu, 1, 0);
        let b = job(2, 5, DeviceKind::Cpu, 1, 0);
        let c = job(3, 0, DeviceKind::Cpu, 1, 0);
        let d = job(4, 5, DeviceKind::Cpu, 1, 0);
        for j in [&a, &b, &c, &d] {
            q.push(j.clone());
        }
        let w = WorkerId::new();
        let order: Vec<JobId> = (0..4).map(|_| take(&mut q, w, &cpu(), &HashSet::new()).unwrap().0.id).collect();
        assert_eq!(order, vec![b.id, d.id, a.id, c.id]);
        assert!(take(&mut q, w, &cpu(), &HashSet::new()).is_none());
    }

    #[test]
    fn by_device_counts_parked_jobs_and_knows_the_oldest() {
        let mut q = Queue::new(0);
        let a = job(1, 0, DeviceKind::Cpu, 1, 0);
        let b = job(2, 9, DeviceKind::Cpu, 1, 0);
        let g = job(3, 0, DeviceKind::Cuda, 1, 0);
        for j in [&a, &b, &g] {
            q.push(j.clone());
        }
        assert_eq!(q.by_device(), [(2, Some(1000)), (1, Some(3000))]);
        // Parked jobs are still queued; unparking does not count them twice.
        assert!(q.park(&a.id));
        assert_eq!(q.by_device()[0], (2, Some(1000)));
        q.unpark(&a.id);
        q.push(a.clone());
        assert_eq!(q.by_device()[0], (2, Some(1000)));
        q.remove(&a.id);
        assert_eq!(q.by_device(), [(1, Some(2000)), (1, Some(3000))]);
        let gpu = vec![dev(DeviceKind::Cuda, 0, 0)];
        assert_eq!(take(&mut q, WorkerId::new(), &gpu, &HashSet::new()).unwrap().0.id, g.id);
        q.remove(&b.id);
        assert_eq!(q.by_device(), [(0, None), (0, None)]);
    }

    #[test]
    fn resources_are_matched() {
        let mut q = Queue::new(0);
        let big_mem = job(1, 9, DeviceKind::Cuda, 1, 80_000);
        let two = job(2, 8, DeviceKind::Cuda, 2, 0);
        let cpu_job = job(3, 0, DeviceKind::Cpu, 1, 0);
        for j in [&big_mem, &two, &cpu_job] {
            q.push(j.clone());
        }
        // A CPU-only worker never sees CUDA jobs.
        let (got, devs) = take(&mut q, WorkerId::new(), &cpu(), &HashSet::new()).unwrap();
        assert_eq!((got.id, devs), (cpu_job.id, vec![0]));
        // One 24 GiB GPU fits neither the 80 GiB job nor the 2-GPU job.
        let small_gpu = vec![dev(DeviceKind::Cuda, 0, 24_000)];
        assert!(take(&mut q, WorkerId::new(), &small_gpu, &HashSet::new()).is_none());
        // Two 24 GiB GPUs fit the 2-GPU job (the 80 GiB one first in order still cannot run).
        let two_gpus = vec![dev(DeviceKind::Cuda, 0, 24_000), dev(DeviceKind::Cuda, 1, 24_000)];
        let (got, devs) = take(&mut q, WorkerId::new(), &two_gpus, &HashSet::new()).unwrap();
        assert_eq!((got.id, devs), (two.id, vec![0, 1]));
        let h100 = vec![dev(DeviceKind::Cuda, 3, 81_000)];
        let (got, devs) = take(&mut q, WorkerId::new(), &h100, &HashSet::new()).unwrap();
        assert_eq!((got.id, devs), (big_mem.id, vec![3]));
        assert!(q.is_empty());
    }

    #[test]
    fn busy_devices_are_not_assigned() {
        let mut q = Queue::new(0);
        let a = job(1, 0, DeviceKind::Cuda, 1, 0);
        q.push(a.clone());
        let gpus = vec![dev(DeviceKind::Cuda, 0, 0), dev(DeviceKind::Cuda, 1, 0)];
        let (_, devs) = take(&mut q, WorkerId::new(), &gpus, &HashSet::from([0])).unwrap();
        assert_eq!(devs, vec![1]);
    }

    #[test]
    fn large_job_is_not_starved_by_small_ones() {
        let mut q = Queue::new(0);
        let gpus = vec![dev(DeviceKind::Cuda, 0, 0), dev(DeviceKind::Cuda, 1, 0)];
        let w = WorkerId::new();
        let big = job(1, 0, DeviceKind::Cuda, 2, 0);
        q.push(big.clone());
        for s in 2..10 {
            q.push(job(s, 0, DeviceKind::Cuda, 1, 0));
        }
        // GPU 0 is busy with an earlier small job: the big job does not fit, so the
        // worker is held for it instead of backfilling GPU 1 with a small job.
        assert!(take(&mut q, w, &gpus, &HashSet::from([0])).is_none());
        assert_eq!(q.reserved_for(&big.id), Some(w));
        assert!(take(&mut q, w, &gpus, &HashSet::from([0])).is_none());
        // Once GPU 0 frees up the big job runs on both.
        let (got, devs) = take(&mut q, w, &gpus, &HashSet::new()).unwrap();
        assert_eq!((got.id, devs), (big.id, vec![0, 1]));
        assert_eq!(q.reserved_for(&big.id), None);
    }

    #[test]
    fn without_reservation_small_jobs_would_win() {
        // The contrast case: a job reserved on another worker lets this one backfill.
        let mut q = Queue::new(0);
        let gpus = vec![dev(DeviceKind::Cuda, 0, 0), dev(DeviceKind::Cuda, 1, 0)];
        let (w1, w2) = (WorkerId::new(), WorkerId::new());
        let big = job(1, 0, DeviceKind::Cuda, 2, 0);
        let small = job(2, 0, DeviceKind::Cuda, 1, 0);
        q.push(big.clone());
        q.push(small.clone());
        assert!(take(&mut q, w1, &gpus, &HashSet::from([0])).is_none());
        let (got, _) = take(&mut q, w2, &gpus, &HashSet::from([1])).unwrap();
        assert_eq!(got.id, small.id, "other workers keep backfilling");
        // A worker that fits the reserved job right away takes it.
        let (got, _) = take(&mut q, w2, &gpus, &HashSet::new()).unwrap();
        assert_eq!(got.id, big.id);
    }

    #[test]
    fn reservations_of_a_dead_worker_are_dropped() {
        let mut q = Queue::new(0);
        let gpus = vec![dev(DeviceKind::Cuda, 0, 0), dev(DeviceKind::Cuda, 1, 0)];
        let (w1, w2) = (WorkerId::new(), WorkerId::new());
        let big = job(1, 0, DeviceKind::Cuda, 2, 0);
        q.push(big.clone());
        assert!(take(&mut q, w1, &gpus, &HashSet::from([0])).is_none());
        q.drop_reservations_of(&w1);
        assert!(take(&mut q, w2, &gpus, &HashSet::from([1])).is_none());
        assert_eq!(q.reserved_for(&big.id), Some(w2));
    }

    #[test]
    fn aging_lets_old_low_priority_jobs_through() {
        // One priority level per 10 s of waiting.
        let mut q = Queue::new(10_000);
        let old_low = QueuedJob { created_ms: 0, ..job(1, 0, DeviceKind::Cpu, 1, 0) };
        let new_high = QueuedJob { created_ms: 30_000, ..job(2, 2, DeviceKind::Cpu, 1, 0) };
        let newer_high = QueuedJob { created_ms: 50_000, ..job(3, 5, DeviceKind::Cpu, 1, 0) };
        for j in [&old_low, &new_high, &newer_high] {
            q.push(j.clone());
        }
        let w = WorkerId::new();
        let order: Vec<JobId> = (0..3).map(|_| take(&mut q, w, &cpu(), &HashSet::new()).unwrap().0.id).collect();
        // scores: old_low 0 - 0 = 0; new_high 20000 - 30000 = -10000; newer_high 50000 - 50000 = 0 (tie -> seq).
        assert_eq!(order, vec![old_low.id, newer_high.id, new_high.id]);
    }

    #[test]
    fn gangs_are_joined_not_taken_and_parking_keeps_them_queued() {
        let mut q = Queue::new(0);
        let gang = QueuedJob { resources: ResourceSpec { nodes: 2, ..ResourceSpec::default() }, ..job(1, 0, DeviceKind::Cpu, 1, 0) };
        let small = job(2, 0, DeviceKind::Cpu, 1, 0);
        q.push(gang.clone());
        q.push(small.clone());
        let w = WorkerId::new();
        // The gang is first: a free worker is told to join it; it stays queued.
        assert_eq!(q.pick(w, &cpu(), &HashSet::new()), Some(Pick::Join(gang.clone(), vec![0])));
        assert_eq!(q.len(), 2);
        // A busy worker does not join (gangs assemble from free workers) and gets nothing
        // else either here (its only device is busy).
        assert_eq!(q.pick(w, &cpu(), &HashSet::from([0])), None);
        // Parked, the gang is out of the order: the small job runs; the gang stays queued.
        assert!(q.park(&gang.id));
        assert!(q.contains(&gang.id) && q.is_parked(&gang.id));
        assert_eq!(take(&mut q, w, &cpu(), &HashSet::new()).map(|(j, _)| j.id), Some(small.id));
        assert_eq!(q.pick(w, &cpu(), &HashSet::new()), None);
        q.unpark(&gang.id);
        assert!(matches!(q.pick(w, &cpu(), &HashSet::new()), Some(Pick::Join(j, _)) if j.id == gang.id));
        assert_eq!(q.remove(&gang.id).map(|j| j.id), Some(gang.id));
        assert!(q.is_empty());
    }

    fn of(tenant: &str, j: QueuedJob) -> QueuedJob {
        QueuedJob { tenant: tenant.into(), ..j }
    }

    #[test]
    fn fair_share_puts_the_tenant_using_less_first() {
        let mut q = Queue::new(0);
        let many: Vec<QueuedJob> = (1..=1000).map(|s| of("a", job(s, 9, DeviceKind::Cpu, 1, 0))).collect();
        for j in &many {
            q.push(j.clone());
        }
        let lone = of("b", job(5000, 0, DeviceKind::Cpu, 1, 0));
        q.push(lone.clone());
        assert_eq!((q.queued_of("a"), q.queued_of("b"), q.queued_of("c")), (1000, 1, 0));
        let quotas = Quotas::default();
        let mut load: HashMap<Tenant, TenantLoad> = HashMap::new();
        let w = WorkerId::new();
        // Both idle: the first job in order (a's, higher priority) goes first.
        let mut held = Vec::new();
        let first = q.pick_fair(w, &cpu(), &HashSet::new(), Fairness { load: &load, quotas: &quotas }, &mut held);
        assert!(matches!(first, Some(Pick::Take(j, _)) if j.id == many[0].id));
        // a now holds a device: b's one job comes before a's 999 others, whatever their priority.
        load.insert("a".into(), TenantLoad { devices: 1, running_jobs: 1 });
        let next = q.pick_fair(w, &cpu(), &HashSet::new(), Fairness { load: &load, quotas: &quotas }, &mut held);
        assert!(matches!(next, Some(Pick::Take(j, _)) if j.id == lone.id));
        assert!(held.is_empty());
        assert_eq!(q.queued_of("b"), 0);
    }

    #[test]
    fn quotas_hold_jobs_back_with_the_reason() {
        let mut q = Queue::new(0);
        let quotas: Quotas = serde_yaml::from_str("tenants: { a: { max_running_jobs: 1 }, b: { max_devices: 2 } }").unwrap();
        let a1 = of("a", job(1, 0, DeviceKind::Cpu, 1, 0));
        let b_big = of("b", job(2, 5, DeviceKind::Cpu, 2, 0));
        let b_small = of("b", job(3, 0, DeviceKind::Cpu, 1, 0));
        for j in [&a1, &b_big, &b_small] {
            q.push(j.clone());
        }
        let load: HashMap<Tenant, TenantLoad> =
            [("a".into(), TenantLoad { devices: 1, running_jobs: 1 }), ("b".into(), TenantLoad { devices: 1, running_jobs: 1 })].into();
        let two = vec![dev(DeviceKind::Cpu, 0, 0), dev(DeviceKind::Cpu, 1, 0)];
        let mut held = Vec::new();
        // a is at its running-jobs quota; b's big job would pass b's device quota: b's small one runs.
        let got = q.pick_fair(WorkerId::new(), &two, &HashSet::new(), Fairness { load: &load, quotas: &quotas }, &mut held);
        assert!(matches!(&got, Some(Pick::Take(j, _)) if j.id == b_small.id), "{got:?}");
        assert!(held.iter().any(|(id, r)| *id == b_big.id && r.contains("max_devices")), "{held:?}");
        // Nothing else may start; the jobs stay queued, each tenant's held job reported.
        let mut held = Vec::new();
        assert_eq!(q.pick_fair(WorkerId::new(), &two, &HashSet::new(), Fairness { load: &load, quotas: &quotas }, &mut held), None);
        let reasons: HashMap<JobId, String> = held.into_iter().collect();
        assert!(reasons[&a1.id].contains("max_running_jobs"), "{reasons:?}");
        assert!(reasons[&b_big.id].contains("max_devices"), "{reasons:?}");
        assert_eq!(q.len(), 2);
        // Once a's job ends, a's next one may start.
        let load: HashMap<Tenant, TenantLoad> = [("b".into(), TenantLoad { devices: 1, running_jobs: 1 })].into();
        let got = q.pick_fair(WorkerId::new(), &two, &HashSet::new(), Fairness { load: &load, quotas: &quotas }, &mut Vec::new());
        assert!(matches!(got, Some(Pick::Take(j, _)) if j.id == a1.id));
    }

    #[test]
    fn remove_and_duplicates() {
        let mut q = Queue::new(0);
        let a = job(1, 0, DeviceKind::Cpu, 1, 0);
        q.push(a.clone());
        q.push(a.clone());
        assert_eq!(q.len(), 1);
        assert_eq!(q.remove(&a.id), Some(a.clone()));
        assert!(!q.contains(&a.id));
        assert!(q.remove(&a.id).is_none());
    }

    /// Randomized invariants (a small property test with a fixed-seed xorshift):
    /// - a pick never assigns a busy or unsuitable device, and assigns exactly `count`;
    /// - every pushed job is picked at most once;
    /// - an idle worker (nothing busy) always gets the first job in order that it can run.
    #[test]
    fn random_pushes_and_picks_keep_invariants() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..50 {
            let mut q = Queue::new(if round % 2 == 0 { 0 } else { 5_000 });
            let mut pending: Vec<QueuedJob> = Vec::new();
            let mut picked = HashSet::new();
            let workers: Vec<(WorkerId, Vec<DeviceInfo>)> = (0..4)
                .map(|_| {
                    let kind = if rnd(2) == 0 { DeviceKind::Cpu } else { DeviceKind::Cuda };
                    let n = 1 + rnd(4) as u32;
                    (WorkerId::new(), (0..n).map(|i| dev(kind, i, 16_000 * (1 + rnd(5)))).collect())
                })
                .collect();
            for step in 0..200i64 {
                if rnd(3) > 0 {
                    let kind = if rnd(2) == 0 { DeviceKind::Cpu } else { DeviceKind::Cuda };
                    let j = QueuedJob { created_ms: step * 100, ..job(step, rnd(4) as i32, kind, 1 + rnd(3) as u32, 16_000 * rnd(4)) };
                    q.push(j.clone());
                    pending.push(j);
                    continue;
                }
                let (w, devices) = &workers[rnd(workers.len() as u64) as usize];
                let idle = rnd(2) == 0;
                let busy: HashSet<u32> = if idle { HashSet::new() } else { devices.iter().filter(|_| rnd(2) == 0).map(|d| d.index).collect() };
                let expected_first = if idle {
                    let key = |j: &QueuedJob| q.key(j);
                    pending.iter().filter(|j| could_fit(&j.resources, devices)).min_by_key(|j| key(j)).map(|j| j.id)
                } else {
                    None
                };
                let before = q.len();
                match take(&mut q, *w, devices, &busy) {
                    Some((j, devs)) => {
                        assert!(picked.insert(j.id), "job picked twice");
                        assert_eq!(devs.len(), j.resources.count as usize);
                        for d in &devs {
                            assert!(!busy.contains(d), "busy device assigned");
                            let info = devices.iter().find(|x| x.index == *d).unwrap();
                            assert!(eligible(&j.resources, info), "unsuitable device assigned");
                        }
                        assert_eq!(q.len(), before - 1);
                        if idle {
                            assert_eq!(Some(j.id), expected_first, "idle worker must get the first runnable job");
                        }
                        pending.retain(|p| p.id != j.id);
                    }
                    None => {
                        assert_eq!(q.len(), before);
                        if idle {
                            assert_eq!(expected_first, None, "idle worker got nothing although a job fits");
                        }
                    }
                }
            }
        }
    }
}
