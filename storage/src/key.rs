//! Object keys built only from validated parts, so that no key can leave the
//! configured prefix: a [`Segment`] is one path component (no `/`, no `..`, no NUL, no
//! control characters, no backslash or `:`), a [`RelPath`] is a non-empty list of
//! segments. [`layout`] is the only place that spells the storage layout.

use crate::Error;
use std::fmt;

/// One validated path component: 1..=255 bytes of printable characters, not `.` or
/// `..`, without `/`, `\`, `:` or NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Segment(String);

impl Segment {
    pub fn new(s: impl Into<String>) -> Result<Self, Error> {
        let s = s.into();
        let bad = |why: &str| Err(Error::InvalidKey { key: s.escape_default().to_string(), reason: why.to_string() });
        if s.is_empty() {
            return bad("empty path component");
        }
        if s.len() > 255 {
            return bad("path component longer than 255 bytes");
        }
        if s == "." || s == ".." {
            return bad("'.' and '..' are not allowed");
        }
        if s.chars().any(|c| c == '/' || c == '\\' || c == ':' || c == '\0' || c.is_control()) {
            return bad("'/', '\\', ':', NUL and control characters are not allowed");
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A relative path of validated segments (`a/b/c`), e.g. a file name inside a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(Vec<Segment>);

impl RelPath {
    /// Parse `a/b/c`; refuses absolute paths, empty components, `.`/`..` and NUL.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.starts_with('/') {
            return Err(Error::InvalidKey { key: s.escape_default().to_string(), reason: "absolute path".into() });
        }
        let parts = s.split('/').map(Segment::new).collect::<Result<Vec<_>, _>>()?;
        Ok(Self(parts))
    }

    pub fn from_segments(parts: Vec<Segment>) -> Result<Self, Error> {
        if parts.is_empty() {
            return Err(Error::InvalidKey { key: String::new(), reason: "empty path".into() });
        }
        Ok(Self(parts))
    }

    /// A relative path from a local path relative to some root (only normal components).
    pub fn from_local(p: &std::path::Path) -> Result<Self, Error> {
        use std::path::Component;
        let mut parts = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(os) => {
                    let s = os.to_str().ok_or_else(|| Error::InvalidKey {
                        key: p.display().to_string(),
                        reason: "file name is not UTF-8".into(),
                    })?;
                    parts.push(Segment::new(s)?);
                }
                _ => {
                    return Err(Error::InvalidKey {
                        key: p.display().to_string(),
                        reason: "only plain relative components are allowed".into(),
                    })
                }
            }
        }
        Self::from_segments(parts)
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    pub fn join(&self, other: &RelPath) -> RelPath {
        let mut v = self.0.clone();
        v.extend(other.0.iter().cloned());
        RelPath(v)
    }

    pub fn child(&self, seg: Segment) -> RelPath {
        let mut v = self.0.clone();
        v.push(seg);
        RelPath(v)
    }

    /// The local path under `root` this relative path names (safe by construction).
    pub fn to_local(&self, root: &std::path::Path) -> std::path::PathBuf {
        let mut p = root.to_path_buf();
        for s in &self.0 {
            p.push(s.as_str());
        }
        p
    }

    pub fn file_name(&self) -> &Segment {
        self.0.last().expect("a RelPath is never empty")
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            f.write_str(s.as_str())?;
        }
        Ok(())
    }
}

/// A sha256 digest as 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self(s.to_string()))
        } else {
            Err(Error::InvalidKey {
                key: s.escape_default().to_string(),
                reason: "not a sha256 digest (64 lowercase hex characters)".into(),
            })
        }
    }

    pub fn from_digest(d: &[u8]) -> Self {
        Self(hex::encode(d))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The storage layout. Every key the system writes is made here.
///
/// ```text
/// datasets/sha256/<hex>                                         content-addressed data
/// jobs/<job>/attempts/<epoch>/checkpoints/step-<n>/{files, manifest.json}
/// jobs/<job>/attempts/<epoch>/adapter/{adapter_config.json, adapter_model.safetensors, manifest.json}
/// jobs/<job>/adapter/{adapter_config.json, adapter_model.safetensors, manifest.json}
/// ```
///
/// Everything a worker writes lives under its attempt prefix
/// `jobs/<job>/attempts/<epoch>/` (the lease's `output_prefix`), its adapter included:
/// a worker whose lease was taken over can then never overwrite a file that the new
/// attempt's committed manifests reference. Only the coordinator writes
/// `jobs/<job>/adapter/`: once it has durably accepted an attempt's `CompleteAttempt`,
/// it copies that attempt's adapter there (manifest last, create-only).
///
/// ```text
/// _lorafleet/probe/<uuid>                                       create-only self-check
/// _lorafleet/coordinator                                        the running coordinator's token (workers check they see it)
/// ```
pub mod layout {
    use super::*;

    pub const MANIFEST: &str = "manifest.json";

    fn seg(s: &str) -> Segment {
        Segment::new(s).expect("layout constants are valid segments")
    }

    pub fn dataset(sha: &Sha256Hex) -> RelPath {
        RelPath(vec![seg("datasets"), seg("sha256"), seg(sha.as_str())])
    }

    pub fn job(job: &Segment) -> RelPath {
        RelPath(vec![seg("jobs"), job.clone()])
    }

    pub fn attempt(job: &Segment, epoch: u64) -> RelPath {
        job_path(job).child(seg("attempts")).child(seg(&epoch.to_string()))
    }

    pub fn checkpoint(job: &Segment, epoch: u64, step: u64) -> RelPath {
        attempt(job, epoch).child(seg("checkpoints")).child(seg(&format!("step-{step}")))
    }

    pub fn adapter(job: &Segment, epoch: u64) -> RelPath {
        attempt(job, epoch).child(seg("adapter"))
    }

    /// The job's final adapter, published by the coordinator from the accepted attempt.
    pub fn final_adapter(job: &Segment) -> RelPath {
        job_path(job).child(seg("adapter"))
    }

    /// Parse an attempt prefix as a lease carries it (`jobs/<job>/attempts/<epoch>/`).
    pub fn parse_attempt(s: &str) -> Result<(Segment, u64), Error> {
        let p = RelPath::parse(s.trim_end_matches('/'))?;
        let parts: Vec<&str> = p.segments().iter().map(|s| s.as_str()).collect();
        match parts.as_slice() {
            ["jobs", job, "attempts", epoch] => {
                let epoch = epoch.parse().map_err(|_| Error::InvalidKey { key: s.to_string(), reason: "epoch is not a number".into() })?;
                Ok((Segment::new(*job)?, epoch))
            }
            _ => Err(Error::InvalidKey { key: s.to_string(), reason: "not an attempt prefix jobs/<job>/attempts/<epoch>/".into() }),
        }
    }

    /// Parse the key of a stored directory's manifest (`.../manifest.json`) into the
    /// directory; refuses anything else.
    pub fn manifest_dir(key: &str) -> Result<RelPath, Error> {
        let p = RelPath::parse(key)?;
        let segs = p.segments();
        if segs.len() < 2 || segs[segs.len() - 1].as_str() != MANIFEST {
            return Err(Error::InvalidKey { key: key.to_string(), reason: "not a manifest key (…/manifest.json)".into() });
        }
        RelPath::from_segments(segs[..segs.len() - 1].to_vec())
    }

    /// Written by the coordinator at start (a fresh token): a worker reads it back through
    /// its own storage settings to prove it sees the coordinator's store.
    pub fn coordinator_marker() -> RelPath {
        RelPath(vec![seg("_lorafleet"), seg("coordinator")])
    }

    pub fn probe(id: &str) -> Result<RelPath, Error> {
        Ok(RelPath(vec![seg("_lorafleet"), seg("probe"), Segment::new(id)?]))
    }

    fn job_path(job: &Segment) -> RelPath {
        self::job(job)
    }

    /// Parse a checkpoint location (`jobs/<job>/attempts/<epoch>/checkpoints/step-<n>`)
    /// as the coordinator hands it back; refuses anything else.
    pub fn parse_checkpoint(s: &str) -> Result<(Segment, u64, u64), Error> {
        let p = RelPath::parse(s.trim_end_matches('/'))?;
        let parts: Vec<&str> = p.segments().iter().map(|s| s.as_str()).collect();
        let bad = || Error::InvalidKey { key: s.to_string(), reason: "not a checkpoint location".into() };
        match parts.as_slice() {
            ["jobs", job, "attempts", epoch, "checkpoints", step] => {
                let epoch: u64 = epoch.parse().map_err(|_| bad())?;
                let step: u64 = step.strip_prefix("step-").and_then(|n| n.parse().ok()).ok_or_else(bad)?;
                Ok((Segment::new(*job)?, epoch, step))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_refuse_escapes() {
        for bad in ["", ".", "..", "a/b", "/abs", "a\0b", "a\\b", "c:", "tab\there", &"x".repeat(256)] {
            assert!(Segment::new(bad).is_err(), "{bad:?}");
        }
        for ok in ["job-1", "adapter_model.safetensors", "step-10", "...x", "a..b", "日本"] {
            Segment::new(ok).unwrap();
        }
    }

    #[test]
    fn rel_paths_refuse_escapes() {
        for bad in ["", "/etc/passwd", "a/../b", "../x", "a//b", "a/./b", "a/", "x\0"] {
            assert!(RelPath::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(RelPath::parse("a/b.json").unwrap().to_string(), "a/b.json");
        assert!(RelPath::from_local(std::path::Path::new("../x")).is_err());
        assert!(RelPath::from_local(std::path::Path::new("/x")).is_err());
        assert_eq!(RelPath::from_local(std::path::Path::new("d/f")).unwrap().to_string(), "d/f");
    }

    #[test]
    fn layout_keys() {
        let job = Segment::new("j1").unwrap();
        assert_eq!(layout::checkpoint(&job, 3, 20).to_string(), "jobs/j1/attempts/3/checkpoints/step-20");
        assert_eq!(layout::adapter(&job, 3).to_string(), "jobs/j1/attempts/3/adapter");
        assert_eq!(layout::parse_attempt("jobs/j1/attempts/3/").unwrap(), (job.clone(), 3));
        assert!(layout::parse_attempt("jobs/j1/attempts/x/").is_err());
        assert!(layout::parse_attempt("jobs/../attempts/1/").is_err());
        assert_eq!(layout::manifest_dir("jobs/j1/attempts/3/adapter/manifest.json").unwrap(), layout::adapter(&job, 3));
        assert!(layout::manifest_dir("jobs/j1/attempts/3/adapter/x.json").is_err());
        assert!(layout::manifest_dir("manifest.json").is_err());
        let sha = Sha256Hex::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(layout::dataset(&sha).to_string(), format!("datasets/sha256/{}", "ab".repeat(32)));
        assert_eq!(layout::parse_checkpoint("jobs/j1/attempts/3/checkpoints/step-20").unwrap(), (job, 3, 20));
        for bad in ["jobs/j1/adapter", "jobs/../attempts/3/checkpoints/step-1", "jobs/j/attempts/x/checkpoints/step-1", "/jobs/j/attempts/1/checkpoints/step-1"] {
            assert!(layout::parse_checkpoint(bad).is_err(), "{bad}");
        }
        assert!(Sha256Hex::parse("AB").is_err());
        assert!(Sha256Hex::parse(&"AB".repeat(32)).is_err());
    }
}
