//! What runs a training job: the engine, behind a trait so tests can drive the worker's
//! plumbing with a scripted trainer.

use lorafleet_engine::collective::Collective;
use lorafleet_engine::train::{TrainObserver, TrainRun};

/// Runs one training job on the calling (dedicated) thread; returns the final loss.
pub trait Trainer: Send + Sync + 'static {
    fn train(&self, run: &TrainRun, observer: &mut dyn TrainObserver) -> lorafleet_engine::Result<f64>;
    /// This worker's ranks of a gang: `collectives[i]` trains on `run.devices[i]`.
    fn train_ranks(&self, _run: &TrainRun, _collectives: Vec<Box<dyn Collective>>, _observer: &mut dyn TrainObserver) -> lorafleet_engine::Result<f64> {
        Err(lorafleet_engine::EngineError::Config("this trainer cannot run gangs".into()))
    }
}

/// The real thing: `lorafleet_engine::train::train`.
pub struct EngineTrainer;

impl Trainer for EngineTrainer {
    fn train(&self, run: &TrainRun, observer: &mut dyn TrainObserver) -> lorafleet_engine::Result<f64> {
        lorafleet_engine::train::train(run, observer).map(|s| s.final_loss)
    }
    fn train_ranks(&self, run: &TrainRun, collectives: Vec<Box<dyn Collective>>, observer: &mut dyn TrainObserver) -> lorafleet_engine::Result<f64> {
        lorafleet_engine::train::train_ranks(run, collectives, observer).map(|s| s.final_loss)
    }
}
