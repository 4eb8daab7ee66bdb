//! Worker settings: command-line flags (each also an environment variable) and device
//! parsing.

use clap::Parser;
use lorafleet_proto as pb;
use std::path::PathBuf;
use std::time::Duration;

/// Whether this build can drive CUDA devices.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

const NO_CUDA: &str = "this binary was built without the `cuda` feature (scripts/build-cuda.sh builds lorafleet-worker and lorafleet with it)";

/// Run a lorafleet worker: register with a coordinator, lease jobs, fine-tune them with
/// the engine, upload checkpoints and adapters to object storage.
///
/// Examples:
///   lorafleet-worker --coordinator http://10.0.0.5:50051 --storage s3://bucket/lorafleet
///   lorafleet-worker --storage file:///srv/lorafleet --devices cpu --cache /var/cache/lorafleet
///   lorafleet-worker --devices cuda:0,1     (only in builds with the `cuda` feature)
///
/// S3 settings come from the standard AWS variables: AWS_ENDPOINT_URL, AWS_REGION,
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_ALLOW_HTTP=true for a plain-http server).
#[derive(Debug, Clone, Parser)]
#[command(name = "lorafleet-worker", version, verbatim_doc_comment)]
#[cfg_attr(feature = "cuda", command(after_help = "This build supports CUDA devices (--devices cuda:N)."))]
#[cfg_attr(
    not(feature = "cuda"),
    command(after_help = "This build has no CUDA support: only --devices cpu (rebuild with `cargo build -p lorafleet-worker --features cuda`).")
)]
pub struct WorkerArgs {
    /// Coordinator gRPC URL (`https://` for a coordinator started with --tls-cert).
    #[arg(long, env = "LORAFLEET_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// PEM file of the CA that signed the coordinator's certificate (default: the system roots).
    #[arg(long, env = "LORAFLEET_CA")]
    pub ca: Option<PathBuf>,
    /// PEM certificate this worker presents to a coordinator that requires one
    /// (`--worker-ca` there), with --tls-key.
    #[arg(long, env = "LORAFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "LORAFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Bearer token (role worker) for a coordinator started with --auth; prefer the
    /// environment variable.
    #[arg(long, env = "LORAFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Name shown in `lorafleet workers` (default: the host name).
    #[arg(long, env = "LORAFLEET_WORKER_NAME")]
    pub name: Option<String>,
    /// Devices to offer: `cpu`, `cpu:0,1` (two CPU slots sharing the machine's cores, each a
    /// data-parallel rank), or `cuda:0,1` (CUDA needs a build with the `cuda` feature).
    #[arg(long, env = "LORAFLEET_DEVICES", default_value = "cpu")]
    pub devices: String,
    /// Local cache for models, datasets and scratch space.
    #[arg(long, env = "LORAFLEET_CACHE", default_value = ".lorafleet/worker-cache")]
    pub cache: PathBuf,
    /// Object storage: by default the coordinator's (it says where at start). Given, it
    /// must name the same place (`file:///dir`, `s3://bucket/prefix`, `az://container/prefix`);
    /// credentials always come from this worker's environment.
    #[arg(long, env = "LORAFLEET_STORAGE")]
    pub storage: Option<String>,
    /// Labels offered to job placement, `key=value` (repeatable).
    #[arg(long = "label", env = "LORAFLEET_WORKER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Long-poll wait of one AcquireJob call, in seconds.
    #[arg(long, env = "LORAFLEET_ACQUIRE_WAIT_SECS", default_value_t = 20)]
    pub acquire_wait_secs: u32,
    /// Skip the startup check that the storage refuses a second create-only put.
    #[arg(long, env = "LORAFLEET_SKIP_CREATE_ONLY_CHECK")]
    pub skip_create_only_check: bool,
    /// Gangs: the host or IP the other members reach this worker's collective ports at
    /// (default: the local address this machine uses to reach the coordinator).
    #[arg(long, env = "LORAFLEET_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Gangs: how long a collective call (a gradient all-reduce, a barrier) waits for the
    /// other ranks before the attempt fails; rank 0's evaluations must fit in it.
    #[arg(long, env = "LORAFLEET_COLLECTIVE_TIMEOUT_SECS", default_value_t = 600)]
    pub collective_timeout_secs: u64,
    /// Gangs: the transport between ranks. `auto`: NCCL when this worker is node 0 of a
    /// gang on CUDA devices in a build with the `cuda` feature (node 0 decides for the
    /// gang), else the TCP ring; `tcp`: always the TCP ring.
    #[arg(long, env = "LORAFLEET_COLLECTIVE", default_value = "auto", value_parser = ["auto", "tcp"])]
    pub collective: String,
    /// How long a checkpoint or adapter upload keeps retrying while object storage is
    /// unreachable or failing (with backoff, the training waiting) before the attempt
    /// fails as retryable, to resume from the last committed checkpoint.
    #[arg(long, env = "LORAFLEET_STORAGE_RETRY_SECS", default_value_t = DEFAULT_STORAGE_RETRY.as_secs())]
    pub storage_retry_secs: u64,
}

/// The default of `--storage-retry-secs`.
pub const DEFAULT_STORAGE_RETRY: Duration = Duration::from_secs(120);

/// One device this worker offers: the CPU (or one of several CPU slots, which share the
/// machine's cores: each is a data-parallel rank) or a CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSel {
    Cpu(u32),
    Cuda(u32),
}

impl DeviceSel {
    /// The device as registered with the coordinator, with its memory (what the
    /// scheduler matches `resources.memory_mib` against): the machine's RAM for the CPU,
    /// the GPU's total memory for a CUDA device; 0 (matches only jobs that ask for no
    /// particular amount) where it cannot be read, with a warning.
    pub fn to_pb(self) -> pb::Device {
        let memory_mib = self.memory_bytes().map(|b| b / (1024 * 1024)).unwrap_or_else(|e| {
            tracing::warn!(device = ?self, error = %e, "device memory unknown; registering 0 MiB");
            0
        });
        match self {
            DeviceSel::Cpu(0) => pb::Device { kind: pb::DeviceKind::Cpu as i32, index: 0, name: "cpu".into(), memory_mib },
            DeviceSel::Cpu(i) => pb::Device { kind: pb::DeviceKind::Cpu as i32, index: i, name: format!("cpu:{i}"), memory_mib },
            DeviceSel::Cuda(i) => pb::Device { kind: pb::DeviceKind::Cuda as i32, index: i, name: format!("cuda:{i}"), memory_mib },
        }
    }

    fn memory_bytes(self) -> Result<u64, String> {
        match self {
            DeviceSel::Cpu(_) => {
                let info = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
                info.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
                    .map(|kb| kb * 1024)
                    .ok_or_else(|| "/proc/meminfo: no MemTotal line in kB".to_string())
            }
            #[cfg(feature = "cuda")]
            DeviceSel::Cuda(i) => match self.open()? {
                candle_core::Device::Cuda(d) => d.cuda_stream().context().total_mem().map(|b| b as u64).map_err(|e| format!("cuda:{i}: {e:?}")),
                _ => Err("not a cuda device".into()),
            },
            #[cfg(not(feature = "cuda"))]
            DeviceSel::Cuda(i) => Err(format!("cuda:{i}: {NO_CUDA}")),
        }
    }

    /// The candle device; CUDA only in builds with the `cuda` feature.
    pub fn open(self) -> Result<candle_core::Device, String> {
        match self {
            DeviceSel::Cpu(_) => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSel::Cuda(i) => candle_core::Device::new_cuda(i as usize).map_err(|e| format!("cuda:{i}: {e}")),
            #[cfg(not(feature = "cuda"))]
            DeviceSel::Cuda(i) => Err(format!("cuda:{i}: {NO_CUDA}")),
        }
    }
}

/// Parse `cpu`, `cpu:0,1` or `cuda:0,1` (also `cuda:0,cuda:1`).
pub fn parse_devices(s: &str) -> Result<Vec<DeviceSel>, String> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(vec![DeviceSel::Cpu(0)]);
    }
    if let Some(list) = s.strip_prefix("cpu:") {
        let mut out = Vec::new();
        for part in list.split(',') {
            let part = part.trim().trim_start_matches("cpu:");
            let i: u32 = part.parse().map_err(|_| format!("--devices: {part:?} is not a CPU slot index"))?;
            if i >= 1024 || out.contains(&DeviceSel::Cpu(i)) {
                return Err(format!("--devices: cpu:{i} listed twice or out of range"));
            }
            out.push(DeviceSel::Cpu(i));
        }
        return Ok(out);
    }
    let Some(list) = s.strip_prefix("cuda:") else {
        return Err(format!("--devices: expected `cpu`, `cpu:0,1` or `cuda:0,1`, got {s:?}"));
    };
    if !CUDA_BUILT {
        return Err(format!("--devices cuda:...: {NO_CUDA}"));
    }
    let mut out = Vec::new();
    for part in list.split(',') {
        let part = part.trim().trim_start_matches("cuda:");
        let i: u32 = part.parse().map_err(|_| format!("--devices: {part:?} is not a CUDA device index"))?;
        if out.contains(&DeviceSel::Cuda(i)) {
            return Err(format!("--devices: cuda:{i} listed twice"));
        }
        out.push(DeviceSel::Cuda(i));
    }
    Ok(out)
}

/// Everything the worker loop needs, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    /// TLS to the coordinator (https:// URLs).
    pub tls: lorafleet_proto::connect::ClientTls,
    /// Bearer token (a coordinator with --auth).
    pub token: Option<lorafleet_proto::connect::Secret>,
    pub name: String,
    pub devices: Vec<DeviceSel>,
    pub labels: Vec<(String, String)>,
    pub cache: PathBuf,
    /// `--storage`: None takes the coordinator's.
    pub storage_url: Option<String>,
    pub storage_options: lorafleet_storage::StorageOptions,
    pub acquire_wait: Duration,
    pub check_create_only: bool,
    /// Gangs: the host other members reach this worker's collective ports at (None: the
    /// local address used to reach the coordinator).
    pub advertise_host: Option<String>,
    /// Gangs: the longest wait of one collective call.
    pub collective_timeout: Duration,
    /// Gangs: NCCL between CUDA devices when the build has it (else the TCP ring).
    pub allow_nccl: bool,
    /// How long an upload to object storage keeps retrying before the attempt fails.
    pub storage_retry: Duration,
}

impl WorkerConfig {
    pub fn from_args(a: &WorkerArgs) -> Result<Self, String> {
        let devices = parse_devices(&a.devices)?;
        let mut labels = Vec::new();
        for l in &a.labels {
            let (k, v) = l.split_once('=').ok_or_else(|| format!("--label: expected key=value, got {l:?}"))?;
            labels.push((k.to_string(), v.to_string()));
        }
        let name = match &a.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "worker".into()),
        };
        Ok(Self {
            coordinator: a.coordinator.clone(),
            tls: lorafleet_proto::connect::ClientTls { ca: a.ca.clone(), cert: a.tls_cert.clone(), key: a.tls_key.clone() },
            token: a.token.clone().map(lorafleet_proto::connect::Secret),
            name,
            devices,
            labels,
            cache: a.cache.clone(),
            storage_url: a.storage.clone(),
            storage_options: Default::default(),
            acquire_wait: Duration::from_secs(a.acquire_wait_secs as u64),
            check_create_only: !a.skip_create_only_check,
            advertise_host: a.advertise_host.clone(),
            collective_timeout: Duration::from_secs(a.collective_timeout_secs.max(1)),
            allow_nccl: a.collective != "tcp",
            storage_retry: Duration::from_secs(a.storage_retry_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_registers_the_machine_memory() {
        let d = DeviceSel::Cpu(0).to_pb();
        if cfg!(target_os = "linux") {
            let kb: u64 = std::fs::read_to_string("/proc/meminfo").unwrap().lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
            assert_eq!(d.memory_mib, kb / 1024);
            assert!(d.memory_mib > 0);
        }
    }

    #[test]
    fn devices() {
        assert_eq!(parse_devices("cpu").unwrap(), vec![DeviceSel::Cpu(0)]);
        assert_eq!(parse_devices("cpu:0,1").unwrap(), vec![DeviceSel::Cpu(0), DeviceSel::Cpu(1)]);
        assert!(parse_devices("cpu:0,0").is_err() && parse_devices("cpu:x").is_err());
        assert_eq!(DeviceSel::Cpu(1).to_pb().name, "cpu:1");
        assert!(parse_devices("gpu").is_err());
        let cuda = parse_devices("cuda:0,1");
        if CUDA_BUILT {
            assert_eq!(cuda.unwrap(), vec![DeviceSel::Cuda(0), DeviceSel::Cuda(1)]);
        } else {
            assert!(cuda.unwrap_err().contains("built without the `cuda` feature"));
        }
        assert!(DeviceSel::Cpu(0).open().is_ok());
    }
}
