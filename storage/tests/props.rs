//! Property tests of the storage key builder and the parsers that feed it: `Segment::new`,
//! `RelPath::parse` / `from_local` / `join` / `child` / `to_local`, the `layout` builders
//! and parsers, `Sha256Hex::parse`, `parse_dataset_ref`, `hub::parse_hf`,
//! `hub::select_files`, `Manifest::parse` and `Storage::open` / `public_url`.
//!
//! - Arbitrary strings (and, where the API takes them, bytes: local paths and manifests)
//!   never panic.
//! - What is accepted matches an independent statement of the form: no `.` or `..`
//!   component, no leading `/`, no empty component, no NUL, backslash, `:` or control
//!   character, at most 255 bytes per component; it round-trips (`RelPath::parse(p.to_string())
//!   == p`); joining accepted parts, and mapping them under a local root, never leaves the
//!   prefix; the layout's keys parse back to what built them.
//! - Every hostile class (`..`, absolute, NUL, control characters, backslash, over-long,
//!   non-UTF-8) is refused.
//!
//! The key APIs take `&str`, so non-UTF-8 cannot reach them except through
//! `RelPath::from_local` (an `OsStr`) and `Manifest::parse` (bytes), both tested here;
//! prost refuses non-UTF-8 strings on decode (`proto/tests/props.rs`).
//!
//! 13 properties, 15,360 cases in all (under a second in a debug build); no failure
//! persistence files are written.

use lorafleet_storage::hub::{parse_hf, select_files};
use lorafleet_storage::manifest::{manifest_key, FORMAT};
use lorafleet_storage::{cache::dataset_ref, layout, parse_dataset_ref, public_url, Manifest, RelPath, Segment, Sha256Hex, Storage};
use lorafleet_shared::testing::{config, control_char, insert};
use proptest::prelude::*;
use proptest::sample::Index;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};


// ---- independent statements of the forms --------------------------------------------

fn segment_ok(s: &str) -> bool {
    (1..=255).contains(&s.len()) && s != "." && s != ".." && !s.chars().any(|c| c == '/' || c == '\\' || c == ':' || c.is_control())
}

fn rel_path_ok(s: &str) -> bool {
    !s.starts_with('/') && s.split('/').all(segment_ok)
}

fn sha_ok(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Every component of `p` (a local path relative to nothing) is a plain name.
fn only_normal(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

// ---- generators ----------------------------------------------------------------------

/// Strings biased towards the characters and shapes the checks look at.
fn tricky() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a./\\\\:\0\t\n ~é%-]{0,12}",
        2 => any::<String>(),
        2 => prop::collection::vec(prop_oneof!["[a-z0-9_.-]{1,6}", Just(".".to_string()), Just("..".to_string()), Just(String::new())], 0..5)
            .prop_map(|v| v.join("/")),
        1 => (250usize..260, "[a-z]").prop_map(|(n, c)| c.repeat(n)),
        1 => (prop::sample::select(vec!["/", "//", "../", "./", "a/../", "a/./", "a//", "\\"]), "[a-z/]{0,10}").prop_map(|(p, s)| format!("{p}{s}")),
    ]
    .boxed()
}

/// A valid segment (possibly odd: spaces, dots, non-ASCII, up to 255 bytes).
fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        4 => "[a-zA-Z0-9_.-]{1,12}",
        1 => "[^/\\\\:\\p{Cc}]{1,12}",
        1 => (200usize..=255).prop_map(|n| "s".repeat(n)),
    ]
    .prop_filter("a valid segment", |s| segment_ok(s))
    .prop_map(|s| Segment::new(s).unwrap())
}

fn rel_path() -> impl Strategy<Value = RelPath> {
    prop::collection::vec(segment(), 1..5).prop_map(|v| RelPath::from_segments(v).unwrap())
}



/// A valid key made hostile in one of the ways that must be refused.
fn hostile_key() -> impl Strategy<Value = String> {
    (rel_path(), any::<Index>(), 0..7usize, control_char()).prop_map(|(p, at, how, c)| {
        let s = p.to_string();
        let mut parts: Vec<String> = s.split('/').map(String::from).collect();
        let i = at.index(parts.len() + 1);
        match how {
            0 => {
                parts.insert(i, "..".into());
                parts.join("/")
            }
            1 => {
                parts.insert(i, ".".into());
                parts.join("/")
            }
            2 => format!("/{s}"),
            3 => insert(&s, at, &c.to_string()),
            4 => insert(&s, at, "\\"),
            5 => {
                parts.insert(i, String::new());
                parts.join("/")
            }
            _ => {
                parts.insert(i, "x".repeat(256));
                parts.join("/")
            }
        }
    })
}

proptest! {
    #![proptest_config(config(2048))]

    /// A segment is accepted exactly when it has the documented form, and kept as given.
    #[test]
    fn segments_match_their_form(s in tricky()) {
        match Segment::new(s.clone()) {
            Ok(seg) => {
                prop_assert!(segment_ok(&s), "accepted {:?}", s);
                prop_assert_eq!(seg.as_str(), s.as_str());
            }
            Err(_) => prop_assert!(!segment_ok(&s), "refused {:?}", s),
        }
    }

    /// A relative path is accepted exactly when every component is a segment and it is
    /// not absolute; it round-trips through its string form.
    #[test]
    fn rel_paths_match_their_form_and_round_trip(s in tricky()) {
        match RelPath::parse(&s) {
            Ok(p) => {
                prop_assert!(rel_path_ok(&s), "accepted {:?}", s);
                prop_assert_eq!(p.to_string(), s.clone());
                prop_assert_eq!(RelPath::parse(&p.to_string()).unwrap(), p.clone());
                prop_assert!(p.segments().iter().all(|g| segment_ok(g.as_str())));
                prop_assert_eq!(p.file_name(), p.segments().last().unwrap());
            }
            Err(_) => prop_assert!(!rel_path_ok(&s), "refused {:?}", s),
        }
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Every hostile key is refused: `..`, `.`, absolute, NUL or a control character,
    /// backslash, an empty or over-long (256-byte) component.
    #[test]
    fn hostile_keys_are_refused(k in hostile_key()) {
        let (manifest, attempt, ckpt) = (format!("{k}/manifest.json"), format!("jobs/{k}/attempts/1/"), format!("jobs/j/attempts/1/checkpoints/{k}"));
        prop_assert!(RelPath::parse(&k).is_err(), "accepted {:?}", k);
        prop_assert!(layout::manifest_dir(&manifest).is_err());
        prop_assert!(layout::parse_attempt(&attempt).is_err());
        prop_assert!(layout::parse_checkpoint(&ckpt).is_err());
    }

    /// Joining accepted parts stays under the first; mapping under a local root stays
    /// under the root, one plain directory level per segment.
    #[test]
    fn joins_stay_under_the_prefix(a in rel_path(), b in rel_path(), seg in segment()) {
        let j = a.join(&b);
        prop_assert_eq!(j.to_string(), format!("{a}/{b}"));
        prop_assert_eq!(j.segments().len(), a.segments().len() + b.segments().len());
        prop_assert_eq!(&j.segments()[..a.segments().len()], a.segments());
        prop_assert_eq!(RelPath::parse(&j.to_string()).unwrap(), j.clone());
        let c = a.child(seg.clone());
        prop_assert_eq!(c.to_string(), format!("{a}/{seg}"));
        prop_assert_eq!(c.file_name(), &seg);

        let root = Path::new("/srv/cache/root");
        let local = j.to_local(root);
        let rel = local.strip_prefix(root).expect("under the root");
        prop_assert!(only_normal(rel));
        prop_assert_eq!(rel.components().count(), j.segments().len());
        // And back: the local path names the same key.
        prop_assert_eq!(RelPath::from_local(rel).unwrap(), j);
    }

    /// Local paths (arbitrary bytes, non-UTF-8 included) never panic `from_local`; what it
    /// accepts is plain components only, maps back under a root, and non-UTF-8 is refused.
    #[test]
    fn local_paths_are_plain_and_utf8(
        parts in prop::collection::vec(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..8),
            "[a-z.]{1,4}".prop_map(String::into_bytes),
            Just(b"..".to_vec()),
            Just(vec![0xff, b'a']),
            Just(vec![b'a', 0xc0, 0x80]),
        ], 1..5),
        absolute in any::<bool>(),
    ) {
        let mut bytes = if absolute { b"/".to_vec() } else { Vec::new() };
        bytes.extend(parts.join(&b'/'));
        let p = Path::new(std::ffi::OsStr::from_bytes(&bytes));
        let utf8 = std::str::from_utf8(&bytes).is_ok();
        match RelPath::from_local(p) {
            Ok(rel) => {
                prop_assert!(utf8 && !absolute && only_normal(p), "accepted {:?}", p);
                prop_assert!(rel.segments().iter().all(|g| segment_ok(g.as_str())));
                let root = Path::new("/root");
                prop_assert_eq!(rel.to_local(root), root.join(p));
            }
            Err(_) => {
                let names_ok = p.components().all(|c| match c {
                    Component::Normal(os) => os.to_str().is_some_and(segment_ok),
                    _ => false,
                });
                prop_assert!(!names_ok || p.components().next().is_none(), "refused {:?}", p);
            }
        }
    }

    /// The layout's keys are under their job and parse back to what built them.
    #[test]
    fn layout_keys_parse_back(job in segment(), epoch in any::<u64>(), step in any::<u64>(), id in tricky()) {
        let attempt = layout::attempt(&job, epoch);
        prop_assert_eq!(attempt.to_string(), format!("jobs/{job}/attempts/{epoch}"));
        prop_assert_eq!(layout::parse_attempt(&format!("{attempt}/")).unwrap(), (job.clone(), epoch));
        let ckpt = layout::checkpoint(&job, epoch, step);
        prop_assert_eq!(ckpt.to_string(), format!("jobs/{job}/attempts/{epoch}/checkpoints/step-{step}"));
        prop_assert_eq!(layout::parse_checkpoint(&ckpt.to_string()).unwrap(), (job.clone(), epoch, step));
        for dir in [ckpt, layout::adapter(&job, epoch), layout::final_adapter(&job), layout::job(&job)] {
            let under = format!("jobs/{job}");
            prop_assert!(dir.to_string().starts_with(&under));
            prop_assert_eq!(layout::manifest_dir(&manifest_key(&dir).to_string()).unwrap(), dir);
        }
        match layout::probe(&id) {
            Ok(p) => {
                prop_assert!(segment_ok(&id));
                prop_assert_eq!(p.to_string(), format!("_lorafleet/probe/{id}"));
            }
            Err(_) => prop_assert!(!segment_ok(&id)),
        }
    }

    /// The layout parsers never panic on arbitrary input and accept only their form.
    #[test]
    fn layout_parsers_accept_only_their_form(
        s in prop_oneof![
            tricky(),
            ("(jobs|x|\\.\\.)?/?[a-z.]{0,3}/?(attempts|checkpoints)?/?[+0-9a-z.-]{0,4}/?(checkpoints)?/?(step-)?[+0-9.]{0,3}/{0,2}"),
        ],
    ) {
        if let Ok((job, epoch)) = layout::parse_attempt(&s) {
            let p = RelPath::parse(s.trim_end_matches('/')).unwrap();
            let parts: Vec<&str> = p.segments().iter().map(|g| g.as_str()).collect();
            prop_assert_eq!(parts.len(), 4);
            prop_assert_eq!((parts[0], parts[1], parts[2]), ("jobs", job.as_str(), "attempts"));
            prop_assert_eq!(parts[3].parse::<u64>().unwrap(), epoch);
        }
        if let Ok((job, epoch, step)) = layout::parse_checkpoint(&s) {
            let p = RelPath::parse(s.trim_end_matches('/')).unwrap();
            let parts: Vec<&str> = p.segments().iter().map(|g| g.as_str()).collect();
            prop_assert_eq!(parts.len(), 6);
            prop_assert_eq!((parts[0], parts[1], parts[2], parts[4]), ("jobs", job.as_str(), "attempts", "checkpoints"));
            prop_assert_eq!(parts[3].parse::<u64>().unwrap(), epoch);
            prop_assert_eq!(parts[5].strip_prefix("step-").unwrap().parse::<u64>().unwrap(), step);
        }
        if let Ok(dir) = layout::manifest_dir(&s) {
            prop_assert_eq!(format!("{dir}/manifest.json"), s);
        }
    }

    /// Digests and dataset refs: exactly 64 lowercase hex; a ref round-trips and its key
    /// is under `datasets/sha256/`.
    #[test]
    fn digests_and_dataset_refs(
        s in prop_oneof![tricky(), "[0-9a-fA-F]{62,66}", "dataset://(sha256|md5)?/?[0-9a-f./]{0,66}"],
    ) {
        prop_assert_eq!(Sha256Hex::parse(&s).is_ok(), sha_ok(&s), "{:?}", s);
        match parse_dataset_ref(&s) {
            None => prop_assert!(!s.starts_with("dataset://")),
            Some(Err(_)) => prop_assert!(!s.strip_prefix("dataset://sha256/").is_some_and(sha_ok)),
            Some(Ok(sha)) => {
                prop_assert_eq!(dataset_ref(&sha), s);
                prop_assert_eq!(layout::dataset(&sha).to_string(), format!("datasets/sha256/{sha}"));
            }
        }
    }

    /// `hf://` sources are accepted exactly when they are `hf://org/name[@revision]` of
    /// the allowed characters, without `..`, a leading `.` or `/`, or an over-long part;
    /// what parses gives back the source.
    #[test]
    fn hf_sources_match_their_form(
        s in prop_oneof![
            tricky().prop_map(|t| format!("hf://{t}")),
            "hf://[a-zA-Z0-9._/-]{0,12}(@[a-zA-Z0-9._/-]{0,12})?",
            (1usize..4, 90usize..100, 120usize..135).prop_map(|(k, n, m)| match k {
                1 => format!("hf://{}/m", "o".repeat(n)),
                2 => format!("hf://o/m@{}", "r".repeat(m)),
                _ => format!("hf://o/{}", "m".repeat(n)),
            }),
            tricky(),
        ],
    ) {
        let part_ok = |p: &str| (1..=96).contains(&p.len()) && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let rev_ok = |r: &str| {
            (1..=128).contains(&r.len()) && !r.contains("..") && !r.starts_with('/') && r.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        let form_ok = s.strip_prefix("hf://").is_some_and(|rest| {
            let (repo, rev) = rest.split_once('@').unwrap_or((rest, "main"));
            let segs: Vec<&str> = repo.split('/').collect();
            segs.len() <= 2 && segs.iter().all(|p| part_ok(p)) && !repo.contains("..") && rev_ok(rev)
        });
        match parse_hf(&s) {
            Ok(r) => {
                prop_assert!(form_ok, "accepted {:?}", s);
                let back = if s.contains('@') { format!("hf://{}@{}", r.repo, r.revision) } else { format!("hf://{}", r.repo) };
                prop_assert_eq!(back, s);
            }
            Err(_) => prop_assert!(!form_ok, "refused {:?}", s),
        }
    }

    /// The Hub files picked for download are plain names directly in the model directory.
    #[test]
    fn selected_hub_files_stay_in_the_model_dir(
        names in prop::collection::vec(prop_oneof![
            tricky().prop_map(|t| format!("{t}.safetensors")),
            tricky(),
            prop::sample::select(vec!["config.json", "tokenizer.json", "model.safetensors", "../x.safetensors", "/abs.safetensors",
                "a/b.safetensors", ".hidden.safetensors", "..safetensors", "..", "./config.json", "sub/config.json"]).prop_map(String::from),
        ], 0..8),
    ) {
        if let Ok(picked) = select_files("hf://o/m", &names) {
            prop_assert!(picked.iter().any(|f| f == "config.json" || f == "adapter_config.json"));
            prop_assert!(picked.iter().any(|f| f.ends_with(".safetensors")));
            for f in &picked {
                prop_assert!(names.contains(f));
                let c: Vec<Component> = Path::new(f).components().collect();
                prop_assert!(matches!(c.as_slice(), [Component::Normal(n)] if n.as_bytes() == f.as_bytes()), "{:?}", f);
                prop_assert!(!f.starts_with('.'));
            }
        }
    }

    /// Manifests: random file lists (names, digests) never panic; an accepted manifest
    /// names only safe, unique relative paths with well-formed digests, never itself.
    #[test]
    fn manifests_refuse_unsafe_names(
        files in prop::collection::vec((prop_oneof![tricky(), Just("manifest.json".to_string()), Just("a/b".to_string())],
            prop_oneof!["[0-9a-f]{64}", tricky()], any::<u64>()), 0..5),
        format_ok in prop::bool::weighted(0.9),
        junk in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let files: Vec<serde_json::Value> = files.iter().map(|(n, s, z)| serde_json::json!({"name": n, "size": z, "sha256": s})).collect();
        let format = if format_ok { FORMAT } else { "lorafleet.manifest.v0" };
        let bytes = serde_json::to_vec(&serde_json::json!({"format": format, "files": files})).unwrap();
        if let Ok(m) = Manifest::parse("k", &bytes) {
            prop_assert!(format_ok);
            let mut seen = std::collections::BTreeSet::new();
            for f in &m.files {
                prop_assert!(rel_path_ok(&f.name) && f.name != "manifest.json", "{:?}", f.name);
                prop_assert_eq!(RelPath::parse(&f.name).unwrap().to_string(), f.name.clone());
                prop_assert!(sha_ok(&f.sha256));
                prop_assert!(seen.insert(f.name.clone()), "duplicate {:?}", f.name);
            }
        }
        let _ = Manifest::parse("k", &junk);
    }

    /// Invalid UTF-8 written over part of a manifest's file name: refused.
    #[test]
    fn non_utf8_manifest_names_are_refused(
        at in any::<Index>(),
        bad in prop::sample::select(vec![vec![0xff], vec![0xc0, 0x80], vec![0x80], vec![0xed, 0xa0, 0x80], vec![0xf4, 0x90, 0x80, 0x80]]),
    ) {
        let marker = "MARKER-name-with-room-0123456789";
        let m = serde_json::json!({"format": FORMAT, "files": [{"name": marker, "size": 1, "sha256": "a".repeat(64)}]});
        let mut bytes = serde_json::to_vec(&m).unwrap();
        prop_assert!(Manifest::parse("k", &bytes).is_ok());
        let start = bytes.windows(marker.len()).position(|w| w == marker.as_bytes()).unwrap();
        let off = start + at.index(marker.len() - bad.len() + 1);
        bytes[off..off + bad.len()].copy_from_slice(&bad);
        prop_assert!(Manifest::parse("k", &bytes).is_err());
    }

    /// Storage URLs: opening an in-memory store under an arbitrary prefix and stripping
    /// secrets from an arbitrary URL never panic.
    #[test]
    fn storage_urls_never_panic(s in tricky()) {
        let _ = Storage::open(&format!("memory://{s}"));
        let _ = Storage::open(&format!("memory://p/{s}"));
        let _ = public_url(&s);
        let _ = public_url(&format!("s3://user:secret@b/{s}"));
    }
}
