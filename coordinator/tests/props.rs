//! Property tests of the coordinator's checks on what callers send: the remote-only
//! location checks of a submitted spec (`service::check_remote_spec`, run after
//! `JobSpec::validate(SpecContext::Remote)` exactly as `SubmitJob` does) and the keys a
//! worker reports (`service::check_job_key`, `service::check_attempt_key`).
//!
//! - Arbitrary locations and keys never panic.
//! - Every hostile location is refused naming its field: a `..` component (in a path or
//!   after a URL scheme), an absolute path, NUL, a backslash, a scheme the field does not
//!   take, a local path where only URLs are taken, a malformed dataset ref; (control
//!   characters and over-long values by the spec's own validation).
//! - A wire spec that passes the conversion, the validation and these checks has no
//!   location with a `..` component, a NUL, a backslash or a leading `/`.
//! - Keys: what `check_job_key` accepts is a safe key under `jobs/<id>/`; what
//!   `check_attempt_key` accepts is under `jobs/<id>/attempts/<epoch>/`; other jobs',
//!   other epochs' and escaping keys are refused.
//!
//! - What the workers' URL parser makes of an accepted `s3://` location is what it says
//!   (bucket, no `..`), the model-source allow-list holds as that parser reads it, and an
//!   accepted attempt key names something under the attempt (each found a hole, since
//!   closed: `%2e%2e`, `bucket@other`, and trailing-slash keys were accepted).
//!
//! 8 properties, under a second in a debug build. No failure persistence files are
//! written.

use lorafleet_coordinator::error::CoordError;
use lorafleet_coordinator::service::{check_attempt_key, check_job_key, check_remote_spec};
use lorafleet_proto::convert::{spec_from_pb, spec_to_pb};
use lorafleet_shared::ids::JobId;
use lorafleet_shared::spec::{JobSpec, SpecContext};
use lorafleet_storage::{public_url, RelPath};
use lorafleet_shared::testing::{config, control_char, insert, component};
use proptest::prelude::*;
use proptest::sample::Index;

const DATASET: &str = "dataset://sha256/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn valid() -> JobSpec {
    let y = format!(
        "name: faq\nmodel: {{ source: hf://org/m }}\ndata: {{ train: {DATASET:?}, eval: s3://b/eval.json }}\n\
         lora: {{ init_adapter: s3://b/adapter }}\noutput: {{ dir: out/faq }}\n"
    );
    let s = JobSpec::from_yaml(&y, SpecContext::Remote).expect("the base spec is valid");
    check_remote_spec(&s).expect("the base spec passes the remote checks");
    s
}


/// The checks `SubmitJob` runs on a converted spec; on refusal, the fields named.
fn submit_checks(s: &JobSpec) -> Result<(), Vec<String>> {
    s.validate(SpecContext::Remote).map_err(|e| e.errors.into_iter().map(|f| f.path).collect::<Vec<_>>())?;
    check_remote_spec(s).map_err(|e| match e {
        CoordError::InvalidArgument(m) => vec![m.split(": ").next().unwrap_or_default().to_string()],
        other => vec![format!("not InvalidArgument: {other}")],
    })
}

/// Locations and what each takes: (field, URL schemes, relative paths too).
const LOCATIONS: [(&str, &[&str], bool); 4] =
    [("model.source", &["hf", "s3"], true), ("lora.init_adapter", &["hf", "s3"], true), ("data.train", &["dataset", "s3"], false), ("data.eval", &["dataset", "s3"], false)];

fn set_location(s: &mut JobSpec, field: &str, v: String) {
    match field {
        "model.source" => s.model.source = v,
        "lora.init_adapter" => s.lora.init_adapter = Some(v),
        "data.train" => s.data.train = v,
        "data.eval" => s.data.eval = Some(v),
        _ => unreachable!("{field}"),
    }
}

/// What an accepted location must be: no NUL, backslash or control character; a URL of
/// one of `schemes` with no `..` component after the scheme, or (if `relative`) a
/// relative path without `..` components.
fn location_ok(l: &str, schemes: &[&str], relative: bool) -> bool {
    if l.contains(['\0', '\\']) || l.chars().any(char::is_control) || l.trim().is_empty() {
        return false;
    }
    match l.split_once("://") {
        Some((scheme, rest)) => {
            schemes.contains(&scheme)
                && !rest.split('/').any(|c| c == "..")
                && (scheme != "dataset" || l.strip_prefix("dataset://sha256/").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))))
        }
        None => relative && !l.starts_with('/') && !l.split('/').any(|c| c == ".."),
    }
}

// ---- generators ----------------------------------------------------------------------




fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..4).prop_map(|v| v.join("/"))
}

/// A location of one of the hostile classes every location must refuse.
fn hostile_location() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["", "s3://", "hf://", "dataset://sha256/"]);
    (scheme, prop::collection::vec(component(), 0..4), any::<Index>(), 0..11usize, control_char()).prop_map(|(scheme, mut parts, at, how, c)| {
        let i = at.index(parts.len() + 1);
        match how {
            // `..` as a whole component, after the scheme or in a relative path.
            0 | 1 => {
                parts.insert(i, "..".into());
                format!("{scheme}{}", parts.join("/"))
            }
            // Absolute paths.
            2 => format!("/{}", parts.join("/")),
            3 => format!("//{}", parts.join("/")),
            // NUL, a control character or a backslash anywhere.
            4 => insert(&format!("{scheme}b/{}", parts.join("/")), at, "\0"),
            5 => insert(&format!("{scheme}b/{}", parts.join("/")), at, &c.to_string()),
            6 => insert(&format!("{scheme}b/{}", parts.join("/")), at, "\\"),
            // Schemes no location takes.
            7 => {
                let schemes = ["file:///", "http://", "https://", "az://", "memory://", "gs://", "ftp://", "S3://"];
                format!("{}{}", schemes[at.index(schemes.len())], parts.join("/"))
            }
            // Malformed dataset refs.
            8 => {
                let refs = ["sha256/abc", "md5/aa", "sha256/", "", "sha256/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"];
                format!("dataset://{}", refs[at.index(refs.len())])
            }
            // A path on the worker's disk (hostile only where a URL is required).
            9 => format!("x/{}", parts.join("/")),
            // Over-long.
            _ => format!("s3://b/{}", "x".repeat(lorafleet_shared::spec::MAX_LOCATION_LEN + 1 + i)),
        }
    })
}

/// Strings biased towards what the checks look at.
fn tricky() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        "(s3|hf|dataset|file|S3)?(://|:/|:)?[a-z./\\\\:\0%@]{0,14}",
        "[./a]{0,8}",
        prop::sample::select(vec!["", "s3://", "hf://", "dataset://sha256/", "s3:///x", "s3://b/./x", "hf://o/m@x/y", "./x", "~/x"]).prop_map(String::from),
    ]
    .boxed()
}

fn job_id() -> impl Strategy<Value = JobId> {
    any::<u128>().prop_map(|u| JobId::from(uuid::Uuid::from_u128(u)))
}

proptest! {
    #![proptest_config(config(2048))]

    /// Hostile locations are refused by the submit checks, naming the field, for every
    /// location, in every class.
    #[test]
    fn hostile_locations_are_refused(field in 0..LOCATIONS.len(), v in hostile_location()) {
        let (name, schemes, relative) = LOCATIONS[field];
        if location_ok(&v, schemes, relative) && v.len() <= lorafleet_shared::spec::MAX_LOCATION_LEN {
            // A relative path where the field takes one: not hostile there.
            prop_assert!(relative && !v.contains("://"), "generator made a valid {:?}", v);
            return Ok(());
        }
        let mut s = valid();
        set_location(&mut s, name, v.clone());
        match submit_checks(&s) {
            Ok(()) => prop_assert!(false, "{} accepted {:?}", name, v),
            Err(fields) => prop_assert!(fields.iter().any(|f| f == name), "{} {:?}: refused as {:?}", name, v, fields),
        }
    }

    /// Arbitrary locations never panic the checks; an accepted one has the form its
    /// field takes, and valid ones are accepted.
    #[test]
    fn locations_match_their_form(field in 0..LOCATIONS.len(), v in tricky(), good_pick in any::<Index>()) {
        let (name, schemes, relative) = LOCATIONS[field];
        let mut s = valid();
        set_location(&mut s, name, v.clone());
        if submit_checks(&s).is_ok() {
            prop_assert!(location_ok(&v, schemes, relative), "{} accepted {:?}", name, v);
        }
        let good = ["hf://org/m", "s3://b/x/y.json", DATASET, "models/tiny", "a.b/c"];
        let g = good[good_pick.index(good.len())];
        if location_ok(g, schemes, relative) {
            let mut s = valid();
            set_location(&mut s, name, g.to_string());
            prop_assert!(submit_checks(&s).is_ok(), "{} refused {:?}", name, g);
        }
    }

    /// Wire specs with random locations: what the conversion, validation and remote
    /// checks all accept has no location with `..`, NUL, a backslash or a leading `/`.
    #[test]
    fn accepted_wire_specs_have_safe_locations(
        locs in prop::collection::vec(prop_oneof![tricky().prop_map(Some), hostile_location().prop_map(Some), Just(None)], 5),
    ) {
        let mut p = spec_to_pb(&valid());
        let set = |v: &Option<String>, to: &mut String| if let Some(v) = v { *to = v.clone() };
        set(&locs[0], &mut p.model.as_mut().unwrap().source);
        set(&locs[1], p.lora.as_mut().unwrap().init_adapter.as_mut().unwrap());
        set(&locs[2], &mut p.data.as_mut().unwrap().train);
        set(&locs[3], p.data.as_mut().unwrap().eval.as_mut().unwrap());
        set(&locs[4], &mut p.output.as_mut().unwrap().dir);
        let Ok(spec) = spec_from_pb(p) else { return Ok(()) };
        if submit_checks(&spec).is_ok() {
            for l in [&spec.model.source, spec.lora.init_adapter.as_ref().unwrap(), &spec.data.train, spec.data.eval.as_ref().unwrap(), &spec.output.dir] {
                let path = l.split_once("://").map_or(l.as_str(), |(_, rest)| rest);
                prop_assert!(!l.contains(['\0', '\\']) && !l.starts_with('/') && !path.split('/').any(|c| c == ".."), "accepted {:?}", l);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(2048))]

    /// Job keys: arbitrary keys never panic; an accepted key is a safe relative key
    /// (trailing `/` aside) under `jobs/<id>/`, never the job directory itself.
    #[test]
    fn job_keys_are_under_their_job(
        id in job_id(),
        other in job_id(),
        tail in prop_oneof![tricky(), "[a-z0-9./-]{0,16}", Just("attempts/1/checkpoints/step-2/manifest.json".to_string())],
        shape in 0..6usize,
    ) {
        let key = match shape {
            0 => format!("jobs/{id}/{tail}"),
            1 => format!("jobs/{other}/{tail}"),
            2 => format!("/jobs/{id}/{tail}"),
            3 => format!("jobs/{id}/../{other}/{tail}"),
            4 => format!("jobs/{}/{tail}", id.to_string().to_uppercase()),
            _ => tail.clone(),
        };
        if check_job_key("k", &id, &key).is_ok() {
            let prefix = format!("jobs/{id}/");
            prop_assert!(key.starts_with(&prefix), "accepted {:?}", key);
            let rest = key[prefix.len()..].trim_end_matches('/');
            prop_assert!(!rest.is_empty(), "accepted the job directory itself: {:?}", key);
            let p = RelPath::parse(rest).map_err(|e| TestCaseError::fail(format!("accepted {key:?}: {e}")))?;
            prop_assert_eq!(p.to_string(), rest);
        }
        if shape == 0 {
            // Under the job, the check is exactly "the rest is a safe relative key".
            let rest = tail.trim_end_matches('/');
            prop_assert_eq!(check_job_key("k", &id, &key).is_ok(), RelPath::parse(rest).is_ok(), "{:?}", key);
        }
    }

    /// Attempt keys: accepted only under this job's `jobs/<id>/attempts/<epoch>/`, never
    /// another job's or another epoch's.
    #[test]
    fn attempt_keys_are_under_their_attempt(
        id in job_id(),
        other in job_id(),
        epoch in prop_oneof![1u64..20, any::<u64>()],
        other_epoch in prop_oneof![1u64..200, any::<u64>()],
        tail in prop_oneof![tricky(), "[a-z0-9./-]{0,16}", Just("checkpoints/step-2/manifest.json".to_string())],
        shape in 0..5usize,
    ) {
        let key = match shape {
            0 => format!("jobs/{id}/attempts/{epoch}/{tail}"),
            1 => format!("jobs/{id}/attempts/{other_epoch}/{tail}"),
            2 => format!("jobs/{other}/attempts/{epoch}/{tail}"),
            3 => format!("jobs/{id}/attempts/{epoch}/../{other_epoch}/{tail}"),
            _ => format!("jobs/{id}/{tail}"),
        };
        if check_attempt_key("k", &id, epoch, &key).is_ok() {
            let prefix = format!("jobs/{id}/attempts/{epoch}/");
            prop_assert!(key.starts_with(&prefix) && key.len() > prefix.len(), "accepted {:?}", key);
            prop_assert!(check_job_key("k", &id, &key).is_ok());
            prop_assert!(RelPath::parse(key.trim_end_matches('/')).is_ok());
        }
        if shape == 2 || (shape == 1 && other_epoch != epoch) {
            prop_assert!(check_attempt_key("k", &id, epoch, &key).is_err(), "accepted {:?}", key);
        }
    }
}

// ---- what the workers' URL parser makes of accepted locations --------------------------

/// `s` with `%XX` escapes decoded (bytes that are not valid UTF-8 become U+FFFD).
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let (b'%', Some(Some(hi)), Some(Some(lo))) = (b[i], b.get(i + 1).map(|&x| hex(x)), b.get(i + 2).map(|&x| hex(x))) {
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An `s3://` location hiding a bucket other than the one written before the first `/`,
/// or a `..` that only the URL parser sees.
fn disguised_s3() -> impl Strategy<Value = String> {
    let dots = prop::sample::select(vec!["%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2E."]);
    (path(), dots, any::<Index>(), any::<bool>()).prop_map(|(p, dots, at, userinfo)| {
        let mut parts: Vec<&str> = p.split('/').collect();
        if userinfo {
            return format!("s3://b@other-bucket/{p}");
        }
        parts.insert(at.index(parts.len() + 1), dots);
        format!("s3://b/{}", parts.join("/"))
    })
}

/// The workers open an `s3://` model or adapter with `Storage::open`, which parses it
/// with the `url` crate (as `public_url` does): an accepted location must name, for that
/// parser, the bucket written before its first `/` and a path with no `..` component.
#[test]
fn accepted_s3_locations_mean_what_they_say() {
    let mut runner = proptest::test_runner::TestRunner::new(config(256));
    runner
        .run(&(0..2usize, disguised_s3()), |(field, v)| {
            let (name, _, _) = LOCATIONS[field];
            let mut s = valid();
            set_location(&mut s, name, v.clone());
            if submit_checks(&s).is_ok() {
                let raw = v.strip_prefix("s3://").unwrap();
                let (bucket, raw_path) = raw.split_once('/').unwrap_or((raw, ""));
                let parsed = public_url(&v);
                let rest = parsed.strip_prefix("s3://").unwrap_or(&parsed);
                let (parsed_bucket, parsed_path) = rest.split_once('/').unwrap_or((rest, ""));
                prop_assert_eq!(parsed_bucket, bucket, "{:?} opens bucket {:?}", v, parsed_bucket);
                prop_assert!(!percent_decode(raw_path).split('/').any(|c| c == ".."), "{:?} opens {:?}", v, parsed);
                prop_assert_eq!(percent_decode(parsed_path), percent_decode(raw_path), "{:?} opens {:?}", v, parsed);
            }
            Ok(())
        })
        .unwrap();
}

/// With `--allow-model-source` prefixes, an accepted model source must still be under an
/// allowed prefix as the workers' URL parser reads it.
#[test]
fn allowed_model_sources_stay_under_their_prefix() {
    use lorafleet_coordinator::sources::{HfRevisions, ModelPolicy};
    let policy = |prefix: &str| ModelPolicy { allow: vec![prefix.to_string()], hf_revisions: HfRevisions::Any, ..Default::default() };
    let cases = prop_oneof![
        path().prop_map(|p| ("s3://models", format!("s3://models/{p}"))),
        path().prop_map(|p| ("s3://models", format!("s3://models@evil/{p}"))),
        path().prop_map(|p| ("s3://models/team-a/", format!("s3://models/team-a/{p}"))),
        path().prop_map(|p| ("s3://models/team-a/", format!("s3://models/team-a/%2e%2e/{p}"))),
        path().prop_map(|p| ("s3://models/team-a/", format!("s3://models/team-a/.%2E/{p}"))),
    ];
    let admitted = std::cell::Cell::new(0u32);
    let mut runner = proptest::test_runner::TestRunner::new(config(256));
    runner
        .run(&cases, |(prefix, source)| {
            let mut s = valid();
            s.model.source = source.clone();
            s.lora.init_adapter = None;
            if submit_checks(&s).is_ok() && futures::executor::block_on(policy(prefix).apply(&mut s)).is_ok() {
                admitted.set(admitted.get() + 1);
                let parsed = public_url(&source);
                let under = format!("{}/", prefix.trim_end_matches('/'));
                prop_assert!(parsed.starts_with(&under), "{:?} admitted under {:?}, opens {:?}", source, prefix, parsed);
                prop_assert!(!percent_decode(&parsed[under.len()..]).split('/').any(|c| c == ".."), "{:?} opens {:?}", source, parsed);
            }
            Ok(())
        })
        .unwrap();
    assert!(admitted.get() > 0, "no source was admitted: the test checks nothing");
}

/// A reported key names something strictly under the attempt's prefix: it parses as a
/// key (no trailing `/` standing for an empty name) with at least one segment past
/// `jobs/<id>/attempts/<epoch>`.
#[test]
fn attempt_keys_name_something_under_the_attempt() {
    let mut runner = proptest::test_runner::TestRunner::new(config(256));
    runner
        .run(&(job_id(), 1u64..100, prop_oneof!["/{1,3}", "[a-z]{1,4}(/[a-z.]{1,12}){0,2}/{0,2}"]), |(id, epoch, tail)| {
            let key = format!("jobs/{id}/attempts/{epoch}/{tail}");
            if check_attempt_key("k", &id, epoch, &key).is_ok() {
                let p = RelPath::parse(&key).map_err(|e| TestCaseError::fail(format!("accepted {key:?}: {e}")))?;
                prop_assert!(p.segments().len() > 4, "accepted {:?}", key);
            }
            Ok(())
        })
        .unwrap();
}
