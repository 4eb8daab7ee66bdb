//! Per-tenant quotas, read from the `quotas:` section of the auth file (reloaded with it
//! on SIGHUP):
//!
//! ```yaml
//! quotas:
//!   default: { max_queued_jobs: 1000, max_running_jobs: 8, max_devices: 16 }
//!   tenants:
//!     acme: { max_running_jobs: 2 }     # the other limits come from `default`
//! ```
//!
//! - `max_queued_jobs`: a submission that would make more queued jobs is refused with
//!   `RESOURCE_EXHAUSTED` (nothing is stored).
//! - `max_devices`: a job needing more devices (`resources.count x resources.nodes`) than
//!   this is refused at submit (it could never run); jobs are not started while the
//!   tenant's running jobs already hold so many devices that this one would exceed it.
//! - `max_running_jobs`: jobs are not started while the tenant runs this many.
//!
//! Jobs held back by a quota stay queued with a waiting reason naming the quota. A missing
//! limit is unlimited; jobs without a tenant (admin tokens without one, or a coordinator
//! without `--auth`) have no quota.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_jobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_jobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u32>,
}

impl TenantQuota {
    /// Each limit of `self`, else `fallback`'s.
    fn or(self, fallback: TenantQuota) -> TenantQuota {
        TenantQuota {
            max_queued_jobs: self.max_queued_jobs.or(fallback.max_queued_jobs),
            max_running_jobs: self.max_running_jobs.or(fallback.max_running_jobs),
            max_devices: self.max_devices.or(fallback.max_devices),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default)]
    pub default: TenantQuota,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantQuota>,
}

/// What a tenant's running jobs hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TenantLoad {
    pub devices: u32,
    pub running_jobs: u32,
}

impl Quotas {
    /// The limits of `tenant` (`""`: no tenant, no limits).
    pub fn of(&self, tenant: &str) -> TenantQuota {
        if tenant.is_empty() {
            return TenantQuota::default();
        }
        self.tenants.get(tenant).copied().unwrap_or_default().or(self.default)
    }

    /// Why `tenant` may not queue one more job of `devices` devices while it has `queued`
    /// queued, if it may not.
    pub fn refuse_submit(&self, tenant: &str, queued: usize, devices: u32) -> Option<String> {
        let q = self.of(tenant);
        if let Some(max) = q.max_devices {
            if devices > max {
                return Some(format!(
                    "tenant {tenant:?}: the job needs {devices} device(s) (resources.count x resources.nodes), more than the tenant's quota of {max} (max_devices); it could never run"
                ));
            }
        }
        if let Some(max) = q.max_queued_jobs {
            if queued >= max as usize {
                return Some(format!(
                    "tenant {tenant:?} has {queued} queued job(s), its quota (max_queued_jobs) is {max}: wait for some to start, or cancel some"
                ));
            }
        }
        None
    }

    /// Why a job of `devices` devices of `tenant` may not start now, given what the
    /// tenant runs, if it may not.
    pub fn hold(&self, tenant: &str, load: TenantLoad, devices: u32) -> Option<String> {
        let q = self.of(tenant);
        if let Some(max) = q.max_running_jobs {
            if load.running_jobs >= max {
                return Some(format!("tenant {tenant:?} runs {} job(s), its quota (max_running_jobs) is {max}", load.running_jobs));
            }
        }
        if let Some(max) = q.max_devices {
            if load.devices + devices > max {
                return Some(format!(
                    "tenant {tenant:?} holds {} device(s); this job's {devices} more would pass its quota (max_devices) of {max}",
                    load.devices
                ));
            }
        }
        None
    }

    /// Problems of a parsed section (tenant names), each naming the entry.
    pub fn check(&self) -> Result<(), String> {
        for t in self.tenants.keys() {
            if !crate::auth::name_ok(t) {
                return Err(format!("quotas.tenants.{t}: tenant names are 1-63 letters, digits, - _ ."));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fall_back_to_the_default_and_name_the_quota() {
        let q: Quotas = serde_yaml::from_str("default: { max_queued_jobs: 2, max_devices: 4 }\ntenants: { acme: { max_running_jobs: 1, max_devices: 8 } }").unwrap();
        assert_eq!(q.of("acme"), TenantQuota { max_queued_jobs: Some(2), max_running_jobs: Some(1), max_devices: Some(8) });
        assert_eq!(q.of("other"), TenantQuota { max_queued_jobs: Some(2), max_running_jobs: None, max_devices: Some(4) });
        assert_eq!(q.of(""), TenantQuota::default());
        assert!(q.refuse_submit("other", 1, 4).is_none());
        assert!(q.refuse_submit("other", 2, 1).unwrap().contains("max_queued_jobs"));
        assert!(q.refuse_submit("other", 0, 5).unwrap().contains("max_devices"));
        assert!(q.refuse_submit("", 1_000_000, 1_000).is_none());
        assert!(q.hold("acme", TenantLoad { devices: 0, running_jobs: 0 }, 8).is_none());
        assert!(q.hold("acme", TenantLoad { devices: 1, running_jobs: 1 }, 1).unwrap().contains("max_running_jobs"));
        assert!(q.hold("other", TenantLoad { devices: 3, running_jobs: 5 }, 2).unwrap().contains("max_devices"));
        assert!(serde_yaml::from_str::<Quotas>("default: { max_jobs: 1 }").is_err());
    }
}
