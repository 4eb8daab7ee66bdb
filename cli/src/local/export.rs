//! `lorafleet export` (a PEFT adapter as a llama.cpp GGUF LoRA adapter) and the
//! output choices of `lorafleet merge` (Hugging Face safetensors or GGUF).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use lorafleet_engine::gguf::{self, GgufDtype};

use super::resolve_source;

/// Output format of `export` (GGUF is the only one: the PEFT directory is the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Gguf,
}

/// Output format of `merge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MergeFormat {
    /// A Hugging Face directory (config.json, model.safetensors, tokenizer files).
    Safetensors,
    /// One llama.cpp GGUF file.
    Gguf,
}

/// Weight type of an exported or merged model. safetensors takes f32 and bf16; GGUF
/// takes all four (norms and 1-D tensors stay f32, and q8_0 falls back to f16 for rows
/// whose length is not a multiple of 32, as llama.cpp's converter does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

impl From<WeightDtype> for GgufDtype {
    fn from(d: WeightDtype) -> Self {
        match d {
            WeightDtype::F32 => GgufDtype::F32,
            WeightDtype::Bf16 => GgufDtype::Bf16,
            WeightDtype::F16 => GgufDtype::F16,
            WeightDtype::Q8_0 => GgufDtype::Q8_0,
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "gguf")]
    pub format: ExportFormat,
    /// Output file.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Base model directory (only its config.json is read); defaults to the adapter's
    /// base_model_name_or_path when that is a local directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Type of the lora_a/lora_b tensors (llama.cpp's converter defaults to f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
}

/// `lorafleet export`.
pub fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    let adapter = resolve_source("--adapter", &a.adapter)?;
    let model = a.model.as_deref().map(|m| resolve_source("--model", m)).transpose()?;
    match a.format {
        ExportFormat::Gguf => gguf::export_adapter(&adapter, model.as_deref(), &a.out, a.dtype.into())?,
    }
    println!("wrote the gguf lora adapter to {}", a.out.display());
    Ok(())
}

/// `lorafleet merge`: the merged model as a Hugging Face directory or one GGUF file.
pub fn run_merge(model: PathBuf, adapter: PathBuf, out: PathBuf, format: MergeFormat, dtype: WeightDtype) -> anyhow::Result<()> {
    let (model, adapter) = (resolve_source("--model", &model)?, resolve_source("--adapter", &adapter)?);
    match format {
        MergeFormat::Safetensors => {
            let dt = match dtype {
                WeightDtype::F32 => candle_core::DType::F32,
                WeightDtype::Bf16 => candle_core::DType::BF16,
                other => anyhow::bail!("--dtype {other:?}: safetensors merges are f32 or bf16 (f16 and q8_0 need --format gguf)"),
            };
            lorafleet_engine::merge::merge_adapter(&model, &adapter, &out, dt)?;
        }
        MergeFormat::Gguf => gguf::merge_to_gguf(&model, &adapter, &out, dtype.into())?,
    }
    println!("wrote the merged model to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{run, LocalCommand};

    #[derive(Debug, clap::Parser)]
    struct TestCli {
        #[command(subcommand)]
        c: LocalCommand,
    }

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
    }

    #[test]
    fn export_and_merge_flags_parse() {
        use clap::Parser;
        let c = TestCli::try_parse_from(["x", "export", "--adapter", "a", "--format", "gguf", "-o", "f.gguf", "--model", "m"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Export(ExportArgs { format: ExportFormat::Gguf, dtype: WeightDtype::F32, .. })));
        let c = TestCli::try_parse_from(["x", "merge", "--model", "m", "--adapter", "a", "--out", "o", "--format", "gguf", "--dtype", "q8_0"]).unwrap();
        assert!(matches!(c.c, LocalCommand::Merge { format: MergeFormat::Gguf, dtype: WeightDtype::Q8_0, .. }));
        let e = TestCli::try_parse_from(["x", "export", "--adapter", "a", "--format", "ggml", "-o", "f"]).unwrap_err().to_string();
        assert!(e.contains("ggml"), "{e}");
    }

    #[test]
    fn export_and_merge_write_gguf() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("a.gguf");
        let adapter = fixtures().join("adapters/tiny-llama");
        let model = fixtures().join("models/tiny-llama");
        let args = ExportArgs { adapter: adapter.clone(), format: ExportFormat::Gguf, out: out.clone(), model: Some(model.clone()), dtype: WeightDtype::F32 };
        run(LocalCommand::Export(args)).unwrap();
        assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");
        let merged = t.path().join("m.gguf");
        run_merge(model.clone(), adapter.clone(), merged.clone(), MergeFormat::Gguf, WeightDtype::F16).unwrap();
        assert_eq!(&std::fs::read(&merged).unwrap()[..4], b"GGUF");
        let e = run_merge(model, adapter, t.path().join("s"), MergeFormat::Safetensors, WeightDtype::Q8_0).unwrap_err().to_string();
        assert!(e.contains("--format gguf"), "{e}");
    }
}
