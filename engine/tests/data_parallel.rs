//! Data parallelism trains exactly what one device trains: the same per-step losses and
//! the same adapter, bit for bit, on 1, 2 and 4 ranks, whether the ranks are threads of
//! one process (the devices of one worker) or split between "processes" (two groups of
//! two ranks of one ring, as two workers of a gang run them), with NF4, LoRA dropout,
//! gradient accumulation and gradient checkpointing on; and a group resumed from a
//! checkpoint continues exactly as the uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use lorafleet_engine::collective::{Collective, RingConfig, RingListener, TcpRing};
use lorafleet_engine::train::{rank_block, train, train_ranks, StepMetrics, TrainObserver, TrainRun};
use lorafleet_shared::spec::{JobSpec, SpecContext};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

#[derive(Default)]
struct Rec {
    losses: Vec<f64>,
    notices: Vec<String>,
    rank_steps: Vec<(usize, u64)>,
    checkpoints: Vec<(u64, PathBuf)>,
}

impl TrainObserver for Rec {
    fn on_step(&mut self, m: &StepMetrics) {
        self.losses.push(m.loss);
    }
    fn on_rank_step(&mut self, rank: usize, m: &StepMetrics) {
        self.rank_steps.push((rank, m.step));
    }
    fn on_notice(&mut self, level: &str, message: &str) {
        self.notices.push(format!("{level}: {message}"));
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) -> lorafleet_engine::Result<()> {
        // Keep a copy: the work dir is reused by the next checkpoint.
        let keep = dir.with_file_name(format!("kept-{step}"));
        copy_dir(dir, &keep);
        self.checkpoints.push((step, keep));
        Ok(())
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The tiny-llama spec: NF4 + f32 compute, dropout, shuffling, accumulation `ga`,
/// gradient checkpointing, 8-bit AdamW (r = 64), a checkpoint every 2 steps.
fn spec(out: &Path, ga: u32, steps: u64) -> JobSpec {
    let y = format!(
        r#"
name: dp
model: {{ source: {m} }}
quantization: {{ method: nf4, double_quant: true, compute_dtype: f32 }}
lora: {{ r: 64, alpha: 16, dropout: 0.1, target_modules: all-linear }}
data: {{ train: {d}, shuffle: true, max_seq_len: 64 }}
training: {{ max_steps: {steps}, micro_batch_size: 1, grad_accum: {ga}, lr: 5.0e-3, schedule: cosine, warmup_steps: 1, weight_decay: 0.01, max_grad_norm: 1.0, optimizer: adamw_8bit, gradient_checkpointing: true, checkpoint_every: 2, seed: 5 }}
output: {{ dir: {o} }}
"#,
        m = fixtures().join("models/tiny-llama").display(),
        d = fixtures().join("train/tiny-llama/data.jsonl").display(),
        o = out.display()
    );
    JobSpec::from_yaml(&y, SpecContext::Local).unwrap()
}

fn run(tmp: &Path, ga: u32, steps: u64, devices: usize, resume: Option<PathBuf>) -> TrainRun {
    let out = tmp.join("out");
    TrainRun {
        spec: spec(&out, ga, steps),
        model_dir: fixtures().join("models/tiny-llama"),
        train_data: fixtures().join("train/tiny-llama/data.jsonl"),
        eval_data: None,
        init_adapter: None,
        output_dir: out,
        work_dir: tmp.join("work"),
        resume_from: resume,
        devices: vec![Device::Cpu; devices],
    }
}

fn adapter(tmp: &Path) -> Vec<u8> {
    std::fs::read(tmp.join("out/adapter_model.safetensors")).unwrap()
}

/// A ring of `world` ranks whose members are handed out in groups of `per_group`, as
/// the workers of a gang each hold their devices' ranks.
fn ring_groups(world: usize, per_group: usize) -> Vec<Vec<Box<dyn Collective>>> {
    let rings = TcpRing::local(world, Duration::from_secs(120)).unwrap();
    let mut groups = Vec::new();
    let mut it = rings.into_iter();
    for _ in 0..world / per_group {
        groups.push(it.by_ref().take(per_group).map(|r| Box::new(r) as Box<dyn Collective>).collect());
    }
    groups
}

#[test]
fn blocks_cover_the_micro_batches_in_order() {
    for ga in 1..12 {
        for world in 1..=ga {
            let blocks: Vec<_> = (0..world).map(|r| rank_block(r, world, ga)).collect();
            assert_eq!(blocks[0].start, 0);
            assert_eq!(blocks[world - 1].end, ga);
            assert!(blocks.windows(2).all(|w| w[0].end == w[1].start && !w[0].is_empty()));
        }
    }
    assert_eq!(rank_block(1, 2, 3), 2..3);
}

#[test]
fn one_two_and_four_ranks_train_the_same_adapter_bit_for_bit() {
    for ga in [4u32, 3] {
        let t1 = tempfile::tempdir().unwrap();
        let mut one = Rec::default();
        train(&run(t1.path(), ga, 3, 1, None), &mut one).unwrap();
        assert_eq!(one.losses.len(), 3);
        assert!(one.notices.is_empty(), "{:?}", one.notices);

        // Two ranks as two devices of one process.
        let t2 = tempfile::tempdir().unwrap();
        let mut two = Rec::default();
        train(&run(t2.path(), ga, 3, 2, None), &mut two).unwrap();
        assert_eq!(one.losses, two.losses, "grad_accum {ga}: losses on 2 ranks");
        assert!(adapter(t1.path()) == adapter(t2.path()), "grad_accum {ga}: adapters on 2 ranks");
        assert_eq!(two.rank_steps.iter().filter(|(r, _)| *r == 1).count(), 3, "rank 1's steps reach the observer");
        // 3 micro-batches over 2 ranks: said, not refused.
        assert_eq!(two.notices.iter().any(|n| n.contains("training.grad_accum")), ga == 3, "{:?}", two.notices);
        if ga < 4 {
            continue;
        }
        // Four ranks split over two "workers" of two devices each: only the group of
        // rank 0 writes the adapter.
        let t4 = tempfile::tempdir().unwrap();
        let (ta, tb) = (t4.path().join("a"), t4.path().join("b"));
        let mut groups = ring_groups(4, 2);
        let (g1, g0) = (groups.pop().unwrap(), groups.pop().unwrap());
        let (ra, rb) = (run(&ta, ga, 3, 2, None), run(&tb, ga, 3, 2, None));
        let (losses_a, losses_b) = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let mut rec = Rec::default();
                train_ranks(&rb, g1, &mut rec).unwrap();
                rec.losses
            });
            let mut rec = Rec::default();
            train_ranks(&ra, g0, &mut rec).unwrap();
            (rec.losses, h.join().unwrap())
        });
        assert_eq!(one.losses, losses_a, "losses on 2 x 2 ranks");
        assert_eq!(one.losses, losses_b, "every rank knows the step loss");
        assert!(adapter(t1.path()) == adapter(&ta), "adapter on 2 x 2 ranks");
        assert!(!tb.join("out/adapter_model.safetensors").exists(), "only rank 0 writes the adapter");
        assert!(ta.join("work/checkpoints/step-2").is_dir());
        assert!(!tb.join("work/checkpoints").exists(), "only rank 0 writes checkpoints");
    }
}

#[test]
fn a_group_resumed_from_a_checkpoint_continues_the_uninterrupted_run() {
    let full = tempfile::tempdir().unwrap();
    let mut rec = Rec::default();
    train(&run(full.path(), 2, 5, 1, None), &mut rec).unwrap();
    let (step, ck) = rec.checkpoints.iter().find(|(s, _)| *s == 2).cloned().unwrap();
    // Only rank 0 reads the checkpoint; rank 1 gets the state by broadcast.
    let resumed = tempfile::tempdir().unwrap();
    let mut rec2 = Rec::default();
    let s = train(&run(resumed.path(), 2, 5, 2, Some(ck)), &mut rec2).unwrap();
    assert_eq!(s.resumed_from_step, Some(step));
    assert_eq!(rec2.losses, rec.losses[2..].to_vec());
    assert!(adapter(full.path()) == adapter(resumed.path()));
}

#[test]
fn a_rank_that_dies_stops_the_others_promptly() {
    // Rank 1 of a two-process ring never starts training (its process "died" after
    // connecting): rank 0 fails with a collective error naming the rank, quickly.
    let l0 = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l1 = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let peers = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let cfg = |rank| RingConfig { rank, peers: peers.clone(), token: 42, timeout: Duration::from_secs(60) };
    let (c0, c1) = (cfg(0), cfg(1));
    let h = std::thread::spawn(move || TcpRing::connect(l1, c1).map(drop));
    let r0 = TcpRing::connect(l0, c0).unwrap();
    h.join().unwrap().unwrap(); // rank 1 connected, then went away
    let tmp = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let err = train_ranks(&run(tmp.path(), 2, 3, 1, None), vec![Box::new(r0)], &mut Rec::default()).unwrap_err();
    assert!(matches!(err, lorafleet_engine::EngineError::Collective(_)), "{err}");
    assert!(err.to_string().contains("rank 1"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn fewer_micro_batches_than_ranks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = train(&run(tmp.path(), 1, 2, 2, None), &mut Rec::default()).unwrap_err().to_string();
    assert!(err.contains("training.grad_accum: 1 micro-batches per step cannot be shared by 2"), "{err}");
}

/// The same equivalence on the portable ops (the code path of CUDA devices, where the
/// gradients cross the host to reach the ring).
#[test]
fn ranks_equal_one_device_on_the_portable_ops() {
    common::rerun_portable("one_two_and_four", 1);
}
